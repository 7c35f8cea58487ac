"""On two ranks (tests/test_distributed.py forks them; `torchrun --nproc-per-node 2` runs it too): each rank
computes MAXL's meta-gradient on its half of a batch (BN-free, float64) and saves it to OUT/rank{r}.pt."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests_distributed_data import batch_and_nets  # noqa: E402

import methods.maxl as maxl  # noqa: E402


def main(out: Path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, generator, x, y = batch_and_nets()
    shard = slice(rank, None, world)
    results = {}
    for first_order in (False, True):
        grads, stats = maxl.meta_gradient(model, generator, x[shard], y[shard], 0.5, 0.2, 2.0,
                                          first_order=first_order)
        results[first_order] = [g.clone() for g in grads]
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
