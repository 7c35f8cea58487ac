"""Several processes (torchrun): sharded sampling, reductions, gathering. Every rank runs the same script on the
same config: models start identical (same seed), data is sharded, metrics are reduced; rank 0 alone writes files."""
import os
import random

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


def all_reduce_sum_(tensors, average: bool = False) -> None:
    """Sum (`average`: average) tensors across ranks, in place, in one collective per dtype (no-op in one process)."""
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
    all_reduce_sum_(tensors, average=True)


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a list of one in one process)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_shards(shard: torch.Tensor) -> torch.Tensor:
    """The rows of an evaluation pass in dataset order, on every rank, from each rank's shard (rank r holds items r,
    r + world_size, ...: `Session.loader` with shuffle=False)."""
    parts = gather_objects(shard)
    whole = torch.empty((sum(len(p) for p in parts), *shard.shape[1:]), dtype=shard.dtype)
    for rank, part in enumerate(parts):
        whole[rank::len(parts)] = part
    return whole


class ShardedShuffleSampler(torch.utils.data.Sampler):
    """A fresh permutation of the whole dataset on every pass, the same on every rank, each rank taking every
    world_size-th index of it. The permutation is seeded by (seed, epoch, pass within the epoch), so it does not
    consume the global RNG. Each item comes as (index, batch seed): the seed of its local batch, from (seed, epoch,
    pass, rank, batch), which `SeededBatches` draws the batch's augmentation from. So a pass gives the same batches
    for any number of loader workers, and `start_pass(p, skip)` resumes it exactly after `skip` batches.
    The pass is cut to a multiple of world_size so that every rank has as many items."""

    def __init__(self, size: int, seed: int, rank: int, world_size: int, batch_size: int):
        self.size, self.seed, self.rank, self.world_size, self.batch_size = size, seed, rank, world_size, batch_size
        self.epoch, self.passes, self.skip = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.passes, self.skip = epoch, 0, 0

    def start_pass(self, index: int, skip_batches: int) -> None:
        """The next iteration is pass `index` of the epoch, from its batch `skip_batches` on."""
        self.passes, self.skip = index, skip_batches

    def __iter__(self):
        keys = [self.seed, self.epoch, self.passes]
        order = np.random.default_rng(keys).permutation(self.size)
        seeds = np.random.default_rng(keys + [self.rank, 1]).integers(2**63, size=len(self) // self.batch_size + 1)
        mine = order[:len(self) * self.world_size][self.rank::self.world_size].tolist()
        first = self.skip * self.batch_size
        self.passes, self.skip = self.passes + 1, 0
        return ((index, int(seeds[position // self.batch_size]))
                for position, index in enumerate(mine[first:], start=first))

    def __len__(self):
        return self.size // self.world_size


class SeededBatches(torch.utils.data.Dataset):
    """A shuffled loader's dataset: item keys are (index, batch seed) pairs from `ShardedShuffleSampler`; each batch
    is loaded with torch, numpy and random seeded by its batch seed. In the main process (num_workers=0) their
    states are restored afterwards, so loading never moves the training RNG (dropout, ...)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys):
        indices = [index for index, _ in keys]
        seed = keys[0][1]
        in_worker = torch.utils.data.get_worker_info() is not None
        saved = None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's stays the training's
        try:
            if hasattr(self.dataset, "__getitems__"):
                return self.dataset.__getitems__(indices)
            return [self.dataset[index] for index in indices]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])
