"""`train_db_size`: with no_replacement every task of the partition unless the user caps it (logged as "using T
of P tasks"); without it the number of random tasks, 2800 when unset; the run name shows it only when set."""
import logging
import re

import numpy as np
import pytest

from dataset.fewshot import FlatDataset, SubDataset, TaskDataset, make_tasks
from dataset.fewshot.tasks import DEFAULT_RANDOM_TASKS
from engine import compose
from methods.scripts import SCRIPTS

N, K, Q = 3, 1, 3


def toy_flat(class_sizes, name="toy") -> FlatDataset:
    labels = np.repeat(np.arange(len(class_sizes)), class_sizes)
    return FlatDataset(np.zeros((len(labels), 1, 1, 3), dtype=np.uint8), labels, transform=None, name=name)


def partition(tasks: TaskDataset) -> list[list[int]]:
    return [tasks.task_indices(i)[1].reshape(-1).tolist() for i in range(len(tasks))]


def test_no_replacement_uses_the_whole_partition_by_default(caplog):
    flat = toy_flat([40, 24, 24, 16, 12, 8])  # 10 + 6 + 6 + 4 + 3 + 2 = 31 chunks of K+Q = 4 images
    with caplog.at_level(logging.INFO, logger="metalabel"):
        tasks = TaskDataset(flat, n_ways=N, n_shots=K, n_queries=Q, no_replacement=True, seed=0)
    used = np.concatenate(partition(tasks))
    assert len(used) == len(np.unique(used))  # every image at most once
    # It stops only when fewer than n_ways classes have a chunk left: what is left is less than n_ways classes'.
    left = {c: n // 4 - np.count_nonzero(flat.labels[used] == c) // 4 for c, n in enumerate([40, 24, 24, 16, 12, 8])}
    assert sum(1 for n in left.values() if n) < N
    assert len(tasks) == tasks.partition_size == (31 - sum(left.values())) // N
    assert f"dataset toy: using {len(tasks)} of {len(tasks)} tasks of the no-replacement partition" in caplog.text


def test_a_cap_keeps_the_first_tasks_of_the_same_partition_and_says_so(caplog):
    flat = toy_flat([20] * 6)
    whole = TaskDataset(flat, n_ways=N, n_shots=K, n_queries=Q, no_replacement=True, seed=5)
    with caplog.at_level(logging.INFO, logger="metalabel"):
        capped = TaskDataset(flat, n_ways=N, n_shots=K, n_queries=Q, no_replacement=True, db_size=4, seed=5)
    assert len(whole) == whole.partition_size > 4 and len(capped) == 4
    assert partition(capped) == partition(whole)[:4]
    assert (f"dataset toy: using 4 of {len(whole)} tasks of the no-replacement partition per epoch "
            f"(train_db_size=4)") in caplog.text
    above = TaskDataset(flat, n_ways=N, n_shots=K, n_queries=Q, no_replacement=True, db_size=1000, seed=5)
    assert partition(above) == partition(whole)


def test_random_tasks_default_to_2800_per_sub_dataset(caplog):
    subsets = [SubDataset("a", toy_flat([5] * 4, "a")), SubDataset("b", toy_flat([5] * 6, "b"))]
    with caplog.at_level(logging.INFO, logger="metalabel"):
        tasks = make_tasks(subsets, n_ways=N, n_shots=K, n_queries=Q, no_replacement=False, seed=0)
    assert DEFAULT_RANDOM_TASKS == 2800 and [len(part) for part in tasks.datasets] == [2800, 2800]
    assert "train_db_size unset: 2800 random tasks per sub-dataset" in caplog.text
    counted = make_tasks(subsets, n_ways=N, n_shots=K, n_queries=Q, no_replacement=False, db_size=7, seed=0)
    assert [len(part) for part in counted.datasets] == [7, 7]
    whole = make_tasks(subsets, n_ways=N, n_shots=K, n_queries=Q, no_replacement=True, seed=0)
    assert [len(part) for part in whole.datasets] == [part.partition_size for part in whole.datasets]


@pytest.mark.parametrize("script", ["learn_meta_repr", "learn_labeler", "fine_tune"])
def test_configs_default_to_the_whole_partition_and_name_a_cap(script):
    default = compose(SCRIPTS[script], [])
    assert default.train_db_size is None and default.no_replacement is True
    assert not re.search(r"_f(\d|None)", default.run_prefix)
    assert "_f300_" in compose(SCRIPTS[script], ["train_db_size=300"]).run_prefix
