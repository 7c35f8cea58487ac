"""MeLa task samplers: shapes, labels, the no-replacement partition, fixed and per-epoch tasks, seeding."""
import numpy as np
import pytest
import torch

from dataset.fewshot import FlatDataset, ImageTransform, SubDataset, TaskDataset, make_tasks
from engine.errors import UserError

N, K, Q = 5, 2, 3


def toy_flat(class_sizes, augment=False, rotate=False, name="toy", seed=0) -> FlatDataset:
    """Class c has class_sizes[c] random 8x8 images; labels start at 10 (shifted to 0 by the dataset)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(class_sizes)) + 10, class_sizes)
    images = rng.integers(0, 256, (len(labels), 8, 8, 3), dtype=np.uint8)
    return FlatDataset(images, labels, ImageTransform((0.5,) * 3, (0.5,) * 3, augment=augment), rotate, name)


def all_tasks(tasks: TaskDataset) -> list[np.ndarray]:
    return [tasks.task_indices(i)[1] for i in range(len(tasks))]


def test_few_shot_task_shapes_labels_and_images():
    flat = toy_flat([12] * 7)
    tasks = TaskDataset(flat, n_ways=N, n_shots=K, n_queries=Q, no_replacement=False, db_size=4, seed=3)
    assert len(tasks) == 4
    task = tasks[2]
    assert task.support_x.shape == (N * K, 3, 8, 8) and task.query_x.shape == (N * Q, 3, 8, 8)
    assert task.support_y.tolist() == np.repeat(np.arange(N), K).tolist()
    assert task.query_y.tolist() == np.repeat(np.arange(N), Q).tolist()
    assert task.support_idx.shape == (N, K) and task.query_idx.shape == (N, Q)
    indices = torch.cat([task.support_idx, task.query_idx], dim=1).numpy()
    assert len(np.unique(indices)) == N * (K + Q)  # no image twice in a task
    assert len(np.unique(flat.labels[indices[:, 0]])) == N  # N different classes, one per row
    assert all(len(np.unique(flat.labels[row])) == 1 for row in indices)
    torch.testing.assert_close(task.support_x, flat.load(task.support_idx.reshape(-1))[0])
    torch.testing.assert_close(task.query_x, flat.load(task.query_idx.reshape(-1))[0])


def test_flat_task_gives_true_labels_and_classes():
    flat = toy_flat([12] * 7)
    task = TaskDataset(flat, n_ways=N, n_shots=K, n_queries=Q, shape="flat", seed=1)[0]
    assert task.x.shape == (N * (K + Q), 3, 8, 8) and task.idx.shape == (N, K + Q)
    assert task.y.tolist() == flat.labels[task.idx.reshape(-1).numpy()].tolist()
    assert task.classes.tolist() == task.y[::K + Q].tolist() and task.y.max() < 7
    torch.testing.assert_close(task.x, flat.load(task.idx.reshape(-1))[0])


def test_no_replacement_tasks_are_disjoint_and_cover_the_usable_images():
    sizes = [23, 17, 12, 30, 9, 25, 14, 11]
    flat = toy_flat(sizes)
    tasks = TaskDataset(flat, n_ways=N, n_shots=K, n_queries=Q, no_replacement=True, seed=7)
    used = np.concatenate([idx.reshape(-1) for idx in all_tasks(tasks)])
    assert len(used) == len(np.unique(used)) == len(tasks) * N * (K + Q)
    per_class_used = np.bincount(flat.labels[used], minlength=len(sizes))
    chunks_left = np.array(sizes) // (K + Q) - per_class_used // (K + Q)
    assert (per_class_used % (K + Q) == 0).all()
    assert np.count_nonzero(chunks_left) < N  # the pass stops only when fewer than N classes have a chunk left
    first_epoch = [t.tolist() for t in all_tasks(tasks)]
    tasks.set_epoch(1)  # fixed_db (the default): the same partition every epoch
    assert [t.tolist() for t in all_tasks(tasks)] == first_epoch
    again = TaskDataset(flat, n_ways=N, n_shots=K, n_queries=Q, no_replacement=True, seed=7)
    assert [t.tolist() for t in all_tasks(again)] == [t.tolist() for t in all_tasks(tasks)]
    other = TaskDataset(flat, n_ways=N, n_shots=K, n_queries=Q, no_replacement=True, seed=8)
    assert [t.tolist() for t in all_tasks(other)] != [t.tolist() for t in all_tasks(tasks)]


def test_no_replacement_without_fixed_db_redraws_the_partition_each_epoch():
    flat = toy_flat([20] * 6)
    tasks = TaskDataset(flat, n_ways=N, n_shots=K, n_queries=Q, no_replacement=True, fixed_db=False, seed=0)
    partitions = []
    for epoch in (0, 1, 0):
        tasks.set_epoch(epoch)
        used = np.concatenate([idx.reshape(-1) for idx in all_tasks(tasks)])
        assert len(used) == len(np.unique(used))
        partitions.append([t.tolist() for t in all_tasks(tasks)])
    assert partitions[0] != partitions[1] and partitions[0] == partitions[2]
    capped = TaskDataset(flat, n_ways=N, n_shots=K, n_queries=Q, no_replacement=True, db_size=3, seed=0)
    assert len(capped) == 3


def test_fixed_random_tasks_repeat_and_others_change_per_epoch():
    flat = toy_flat([10] * 8)
    fixed = TaskDataset(flat, n_ways=N, n_shots=K, n_queries=Q, no_replacement=False, fixed_db=True, db_size=6)
    fresh = TaskDataset(flat, n_ways=N, n_shots=K, n_queries=Q, no_replacement=False, fixed_db=False, db_size=6)
    first_fixed, first_fresh = all_tasks(fixed), all_tasks(fresh)
    fixed.set_epoch(1)
    fresh.set_epoch(1)
    assert all(np.array_equal(a, b) for a, b in zip(first_fixed, all_tasks(fixed)))
    assert not all(np.array_equal(a, b) for a, b in zip(first_fresh, all_tasks(fresh)))
    replay = TaskDataset(flat, n_ways=N, n_shots=K, n_queries=Q, no_replacement=False, fixed_db=False, db_size=6)
    replay.set_epoch(1)  # a resumed run asks for epoch 1 directly and gets the same tasks
    assert all(np.array_equal(a, b) for a, b in zip(all_tasks(fresh), all_tasks(replay)))


def test_augmented_tasks_do_not_depend_on_worker_count():
    flat = toy_flat([10] * 6, augment=True)
    tasks = TaskDataset(flat, n_ways=N, n_shots=K, n_queries=Q, no_replacement=False, fixed_db=True, db_size=4)
    tasks.set_epoch(3)
    batches = [list(torch.utils.data.DataLoader(tasks, batch_size=None, num_workers=workers)) for workers in (0, 2)]
    for a, b in zip(*batches):
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_idx, b.query_idx)
    plain = flat.with_options(augment=False).load(tasks[0].support_idx.reshape(-1))[0]
    assert not torch.equal(tasks[0].support_x, plain)
    tasks.set_epoch(4)  # a fixed task keeps its images but gets new augmentation in another epoch
    assert torch.equal(tasks[0].support_idx, batches[0][0].support_idx)
    assert not torch.equal(tasks[0].support_x, batches[0][0].support_x)


def test_mixed_tasks_come_from_one_domain_each():
    domains = [SubDataset(name, toy_flat(sizes, name=name, seed=seed))
               for seed, (name, sizes) in enumerate((("aircraft", [10] * 6), ("cub", [5] * 9), ("vgg", [15] * 5)))]
    tasks = make_tasks(domains, n_ways=N, n_shots=K, n_queries=Q, no_replacement=False, db_size=3, seed=0)
    assert len(tasks) == 9 and tasks.names == ["aircraft", "cub", "vgg"]
    for i in range(9):
        flat = domains[i // 3].flat
        task = tasks[i]
        torch.testing.assert_close(task.support_x, flat.load(task.support_idx.reshape(-1))[0])
    partition = make_tasks(domains, n_ways=N, n_shots=K, n_queries=Q, no_replacement=True, fixed_db=False, seed=0)
    partition.set_epoch(1)
    assert len(partition) == sum(len(part) for part in partition.datasets)


def test_rotated_copies_are_classes_of_their_own():
    flat = toy_flat([6] * 3, rotate=True)
    tasks = TaskDataset(flat, n_ways=N, n_shots=K, n_queries=Q, shape="flat", seed=0)
    assert len(tasks.classes) == 12
    task = tasks[0]
    torch.testing.assert_close(task.x, flat.load(task.idx.reshape(-1))[0])
    assert task.y.max() < 12 and task.classes.tolist() == task.y[::K + Q].tolist()


def test_impossible_tasks_are_user_errors():
    flat = toy_flat([10, 10, 10, 4])
    with pytest.raises(UserError, match=r"n_ways=5 but dataset .* has only 4 classes: lower n_ways to at most 4"):
        TaskDataset(flat, n_ways=5, n_shots=1, n_queries=1)
    with pytest.raises(UserError, match=r"n_shots=\d+ with n_queries=\d+ takes 5 images per class but class 3 of dataset .* has 4"):
        TaskDataset(flat, n_ways=3, n_shots=2, n_queries=3)
    with pytest.raises(UserError, match="db_size=None: no_replacement=false draws db_size random tasks"):
        TaskDataset(flat, n_ways=3, n_shots=1, n_queries=1, no_replacement=False)
    with pytest.raises(UserError, match="db_size=0: .*set train_db_size to a positive number"):
        TaskDataset(flat, n_ways=3, n_shots=1, n_queries=1, db_size=0)
    with pytest.raises(UserError, match="sample_shape=flatter"):
        TaskDataset(flat, n_ways=3, n_shots=1, n_queries=1, shape="flatter")
