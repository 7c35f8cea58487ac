"""Several processes (torchrun): sharded sampling, reductions, per-rank RNG state in checkpoints.

Every rank runs the same script on the same config. Models start identical (same seed), data is sharded, and
metrics are reduced; rank 0 alone writes logs, metrics and checkpoints.
"""
import os

import numpy as np
import torch
import torch.distributed as dist


def adopt_submitit_ranks() -> None:
    """Inside a job of Hydra's submitit launcher (hydra/launcher=slurm) with several tasks, one per GPU: set the
    variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from the job."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or "RANK" in os.environ:
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_(tensors, average: bool) -> None:
    """One collective for all of `tensors` (flattened into one buffer per dtype), written back in place."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    by_dtype = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        buffer = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(buffer)
        if average:
            buffer /= world
        for tensor, part in zip(group, buffer.split([t.numel() for t in group])):
            tensor.copy_(part.view_as(tensor))


def all_reduce_mean_(tensors) -> None:
    """Average tensors across ranks, in place (no-op in one process)."""
    _all_reduce_(list(tensors), average=True)


def all_reduce_sum_(tensors) -> None:
    """Sum tensors across ranks, in place (no-op in one process)."""
    _all_reduce_(list(tensors), average=False)


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a list of one in one process)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class ShardedShuffleSampler(torch.utils.data.Sampler):
    """A fresh permutation of the whole dataset on every pass, the same on every rank, each rank taking every
    world_size-th index of it. The permutation is seeded by (seed, epoch, pass within the epoch), so it does not
    consume the global RNG and a resumed run (which restarts at an epoch boundary) sees the same order.

    With drop_last the pass is cut to a multiple of world_size * batch_size so that ranks stay in step.
    """

    def __init__(self, size: int, seed: int, rank: int, world_size: int, batch_size: int, drop_last: bool):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.batch_size, self.drop_last = batch_size, drop_last
        self.epoch, self.passes = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.passes = epoch, 0

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch, self.passes])
        self.passes += 1
        order = rng.permutation(self.size)
        usable = self._usable()
        return iter(order[:usable][self.rank::self.world_size].tolist())

    def _usable(self) -> int:
        if self.drop_last:
            step = self.world_size * self.batch_size
            return self.size // step * step
        return self.size // self.world_size * self.world_size

    def __len__(self):
        return self._usable() // self.world_size


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation: rank r takes indices r, r + world_size, ... in order (no padding, every sample once)."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = range(rank, size, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
