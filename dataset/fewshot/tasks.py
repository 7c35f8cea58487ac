"""Meta-training tasks drawn from flat datasets.

A task is N classes (`n_ways`) with K support (`n_shots`) and Q query (`n_queries`) images each, as a
`FewShotTask` (`few_shot`: local labels repeat(arange(N), K)) or a `FlatTask` (`flat`, for the labeler: all
N*(K+Q) images class-major with their true labels, the N true classes, indices [N, K+Q]).
- random (`no_replacement=False`): `db_size` tasks, each N classes then K+Q images per class, drawn from (seed, i)
  with `fixed_db` (the same every epoch), otherwise from (seed, epoch, i).
- no replacement (GFSL): every class's images are shuffled and cut into chunks of K+Q; while N classes still
  have a chunk, a task takes the next chunk of N classes picked at random, so an image is used at most once per
  epoch. The partition is drawn from `seed` (`fixed_db`) or (seed, epoch); `db_size` keeps its first tasks only
  (the log says "using T of P tasks"). `make_tasks` reads db_size=None as the whole partition, and without
  no_replacement as DEFAULT_RANDOM_TASKS (the original's train_db_size).
Augmentation of task i draws from (seed, epoch, i), not the worker's RNG: the same tasks for any number of loader
workers and after a resume. `set_epoch(epoch)` (session.fit calls it before every epoch; call it yourself outside
the engine) is what changes non-fixed tasks and augmentation between epochs.
Each item is a whole task: `session.loader(tasks, tasks_per_step)` stacks them on a leading axis [T, ...], a plain
`DataLoader(tasks, batch_size=None)` yields them one by one. Rotated copies (rotate_aug) are classes of their own.
"""
import copy
import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

from dataset.fewshot.flat import FlatDataset
from engine.errors import UserError
from engine.settings import POSITIVE_INT, AnyOf, Boolean, Null, setting

log = logging.getLogger("metalabel")

SHAPES = ("few_shot", "flat")
DEFAULT_RANDOM_TASKS = 2800  # random tasks per sub-dataset when train_db_size is unset (the original's default)


@dataclass
class TaskShapeSettings:
    """Few-shot tasks: classes and query images per class."""

    n_ways: int = setting(5, POSITIVE_INT, "classes per task")
    n_queries: int = setting(15, POSITIVE_INT, "query images per class")


@dataclass
class TrainingTaskSettings(TaskShapeSettings):
    """The training (or labelling) tasks drawn from the train split."""

    n_shots: int = setting(5, POSITIVE_INT, "support images per class")
    no_replacement: bool = setting(True, Boolean(), "each image at most once per epoch (the GFSL partition, seeded "
                                   "by seed)")
    fixed_db: bool = setting(True, Boolean(), "the same tasks every epoch (false: drawn anew each epoch)")
    train_db_size: object = setting(None, AnyOf((Null(f"the whole partition, or {DEFAULT_RANDOM_TASKS} random "
                                                      f"tasks"), POSITIVE_INT)),
                                    "tasks per sub-dataset. no_replacement: null = the whole partition, N = at "
                                    f"most N; no_replacement=false: N random tasks, null = {DEFAULT_RANDOM_TASKS}")


def check_tasks_fit(labels, where: str, n_ways: int, n_shots: int, n_queries: int, ways_key: str = "n_ways",
                    shots_key: str = "n_shots") -> None:
    """The data labelled `labels` can hold n_ways-way tasks of n_shots + n_queries images per class (the one check
    of training, labelling and evaluation tasks); the message names the keys the user sets."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    if n_ways > len(classes):
        raise UserError(f"{ways_key}={n_ways} but {where} has only {len(classes)} classes: lower {ways_key} to at "
                        f"most {len(classes)}")
    smallest, needed = int(np.argmin(counts)), n_shots + n_queries
    if needed > counts[smallest]:
        raise UserError(f"{shots_key}={n_shots} with n_queries={n_queries} takes {needed} images per class but "
                        f"class {classes[smallest]} of {where} has {counts[smallest]}: lower {shots_key} or n_queries")


# Tags that keep the random streams of different purposes apart for the same (seed, epoch, index).
_FIXED_TASK, _EPOCH_TASK, _AUGMENTATION, _PARTITION = range(4)


class FewShotTask(NamedTuple):
    support_x: torch.Tensor  # [N*K, 3, H, W]
    support_y: torch.Tensor  # [N*K] local labels, class-major: 0 x K, 1 x K, ...
    query_x: torch.Tensor  # [N*Q, 3, H, W]
    query_y: torch.Tensor  # [N*Q]
    support_idx: torch.Tensor  # [N, K] indices into the flat dataset
    query_idx: torch.Tensor  # [N, Q]


class FlatTask(NamedTuple):
    x: torch.Tensor  # [N*(K+Q), 3, H, W], class-major
    y: torch.Tensor  # [N*(K+Q)] true labels of the flat dataset
    classes: torch.Tensor  # [N] the task's true classes
    idx: torch.Tensor  # [N, K+Q] indices into the flat dataset


class TaskDataset(torch.utils.data.Dataset):
    """Tasks over one flat dataset. `stream` keeps the tasks of several sub-datasets of one run apart."""

    def __init__(self, flat: FlatDataset, *, n_ways: int, n_shots: int, n_queries: int, shape: str = "few_shot",
                 no_replacement: bool = True, fixed_db: bool = True, db_size: int | None = None, seed: int = 0,
                 stream: int = 0):
        if shape not in SHAPES:
            raise UserError(f"sample_shape={shape} is not one of {', '.join(SHAPES)}")
        for key, value in (("n_ways", n_ways), ("n_shots", n_shots), ("n_queries", n_queries)):
            if int(value) < (0 if key == "n_queries" else 1):
                raise UserError(f"{key}={value} is too small: tasks need n_ways >= 1, n_shots >= 1, n_queries >= 0")
        if (db_size is None and not no_replacement) or (db_size is not None and int(db_size) < 1):
            raise UserError(f"db_size={db_size}: no_replacement=false draws db_size random tasks (and with "
                            f"no_replacement it caps the tasks per epoch): set train_db_size to a positive number")
        if flat.labels.ndim != 1:
            raise UserError(f"dataset {flat.name} has {flat.labels.shape[1]} label levels; tasks need one")
        self.flat = flat
        self.n_ways, self.n_shots, self.n_queries = int(n_ways), int(n_shots), int(n_queries)
        self.shape, self.no_replacement, self.fixed_db = shape, bool(no_replacement), bool(fixed_db)
        self.db_size = None if db_size is None else int(db_size)
        self.seed, self.stream = int(seed) % 2**63, int(stream)
        targets = flat.targets()
        order = np.argsort(targets, kind="stable")
        self.classes, starts, counts = np.unique(targets[order], return_index=True, return_counts=True)
        self.members = [order[s:s + c] for s, c in zip(starts, counts)]  # item indices of each class
        check_tasks_fit(targets, f"dataset {flat.name}", self.n_ways, self.n_shots, self.n_queries)
        self._partition = None
        self.partition_size = None  # P: the tasks of one no-replacement partition, before the db_size cap
        self.set_epoch(0)
        if self.no_replacement:
            capped = "" if self.db_size is None else f" (train_db_size={self.db_size})"
            log.info(f"dataset {flat.name}: using {len(self)} of {self.partition_size} tasks of the no-replacement "
                     f"partition per epoch{capped}")

    @property
    def per_class(self) -> int:
        return self.n_shots + self.n_queries

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stream, *keys])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose tasks and augmentation the following iteration gives."""
        self.epoch = int(epoch)
        if self.no_replacement and (self._partition is None or not self.fixed_db):
            rng = self._rng(_PARTITION) if self.fixed_db else self._rng(_PARTITION, self.epoch)
            self._partition = self._draw_partition(rng)

    def _draw_partition(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(classes [T, N] positions into self.classes, indices [T, N, K+Q]), each index at most once."""
        chunks = []  # per class: [chunks, K+Q]
        for members in self.members:
            shuffled = rng.permutation(members)
            usable = len(shuffled) // self.per_class * self.per_class
            chunks.append(shuffled[:usable].reshape(-1, self.per_class))
        left = np.array([len(c) for c in chunks])
        task_classes, task_indices = [], []
        while True:
            alive = np.flatnonzero(left)
            if len(alive) < self.n_ways:
                break
            picked = rng.choice(alive, self.n_ways, replace=False)
            task_classes.append(picked)
            task_indices.append(np.stack([chunks[c][len(chunks[c]) - left[c]] for c in picked]))
            left[picked] -= 1
        classes, indices = np.stack(task_classes), np.stack(task_indices)
        self.partition_size = len(classes)
        return classes[:self.db_size], indices[:self.db_size]  # [:None] keeps them all

    def __len__(self) -> int:
        return len(self._partition[0]) if self.no_replacement else self.db_size

    def task_indices(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Task `index` of the current epoch: its true classes [N] and flat-dataset indices [N, K+Q]."""
        if not 0 <= index < len(self):
            raise IndexError(f"task {index} of {len(self)}")
        if self.no_replacement:
            positions, indices = self._partition[0][index], self._partition[1][index]
        else:
            rng = self._rng(_FIXED_TASK, index) if self.fixed_db else self._rng(_EPOCH_TASK, self.epoch, index)
            positions = rng.choice(len(self.classes), self.n_ways, replace=False)
            indices = np.stack([rng.choice(self.members[p], self.per_class, replace=False) for p in positions])
        return self.classes[positions], indices

    def __getitem__(self, index: int) -> FewShotTask | FlatTask:
        classes, indices = self.task_indices(index)
        n, k = self.n_ways, self.n_shots
        # Few-shot tasks gather all support images, then all query images: both are slices of one batch.
        if self.shape == "flat":
            order = indices.reshape(-1)
        else:
            order = np.concatenate([indices[:, :k].reshape(-1), indices[:, k:].reshape(-1)])
        _, height, width, channels = self.flat.images.shape
        augmentation = torch.Generator().manual_seed(int(self._rng(_AUGMENTATION, self.epoch, index).integers(2**63)))
        # In a loader worker the task is written into shared memory, which the loader passes on without a copy.
        in_worker = get_worker_info() is not None
        out = torch.empty(len(order), channels, height, width).share_memory_() if in_worker else None
        x, y = self.flat.load(order, out=out, generator=augmentation)
        indices = torch.from_numpy(indices)
        if self.shape == "flat":
            return FlatTask(x, y, torch.from_numpy(classes), indices)
        local = torch.arange(n)
        return FewShotTask(support_x=x[:n * k], support_y=local.repeat_interleave(k), query_x=x[n * k:],
                           query_y=local.repeat_interleave(self.n_queries), support_idx=indices[:, :k],
                           query_idx=indices[:, k:])

    def image_bytes(self) -> int:
        return self.flat.image_bytes()

    def images_on(self, device: torch.device) -> "TaskDataset":
        """The same tasks with the flat dataset's images on `device`."""
        moved = copy.copy(self)
        moved.flat = self.flat.images_on(device)
        return moved


class TaskMixture(torch.utils.data.ConcatDataset):
    """The tasks of several sub-datasets one after the other (mixed: each task from one domain), as the original."""

    def __init__(self, parts: dict[str, TaskDataset]):
        super().__init__(list(parts.values()))
        self.names = list(parts)

    def set_epoch(self, epoch: int) -> None:
        for part in self.datasets:
            part.set_epoch(epoch)
        self.cumulative_sizes = self.cumsum(self.datasets)  # no-replacement passes may change length per epoch

    def image_bytes(self) -> int:
        return sum(part.image_bytes() for part in self.datasets)

    def images_on(self, device: torch.device) -> "TaskMixture":
        return TaskMixture({name: part.images_on(device) for name, part in zip(self.names, self.datasets)})


def make_tasks(subsets, *, n_ways: int, n_shots: int, n_queries: int, shape: str = "few_shot",
               no_replacement: bool = True, fixed_db: bool = True, db_size: int | None = None,
               seed: int = 0) -> TaskMixture:
    """Tasks over every sub-dataset of a split (`load_split`'s list); `db_size` counts tasks per sub-dataset:
    with no_replacement a cap (None: every task of the partition), without it the number of random tasks (None:
    DEFAULT_RANDOM_TASKS)."""
    if db_size is None and not no_replacement:
        db_size = DEFAULT_RANDOM_TASKS
        log.info(f"train_db_size unset: {db_size} random tasks per sub-dataset (the original's default)")
    return TaskMixture({
        sub.name: TaskDataset(sub.flat, n_ways=n_ways, n_shots=n_shots, n_queries=n_queries, shape=shape,
                              no_replacement=no_replacement, fixed_db=fixed_db, db_size=db_size, seed=seed,
                              stream=stream)
        for stream, sub in enumerate(subsets)})
