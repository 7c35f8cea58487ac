"""Throughput of the MeLa data pipeline, as JSON lines on stdout.

    python bench/bench_data.py [--num-workers 4] [--seconds 5] [--images-per-class 100]

- tasks_per_s: few-shot tasks (5-way 5-shot 15-query, 84x84, no-replacement sampler) through a DataLoader with
  --num-workers workers, without and with augmentation;
- images_per_s: the flat training pipeline (batch 64, augmentation, shuffled) through a DataLoader;
- profile: where one task's time goes, in one thread of the main process (gather of the uint8 images, their
  per-image augmentation, conversion to float with rotation and normalisation).
Data: generated in memory with miniImageNet's shape (64 classes of 84x84 images, uint8 HWC).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

from dataset.fewshot import FlatDataset, ImageTransform, TaskDataset  # noqa: E402

IMAGENET_MEAN = (0.472140644, 0.4533082913, 0.4099612805)
IMAGENET_STD = (0.2771838538, 0.2677504095, 0.2844904129)
N_WAYS, N_SHOTS, N_QUERIES, BATCH = 5, 5, 15, 64


def throughput(loader, items_of, seconds: float) -> float:
    """Items per second over at least `seconds`, after the first batch (worker start-up) is out of the way."""
    count, began, iterator = 0, None, iter(loader)
    while True:
        for batch in iterator:
            if began is None:
                began = time.perf_counter()
                continue
            count += items_of(batch)
            if time.perf_counter() - began >= seconds:
                return count / (time.perf_counter() - began)
        iterator = iter(loader)


def profile(flat: FlatDataset, tasks: TaskDataset, repeats: int = 20) -> dict[str, float]:
    """Milliseconds per task of each stage, single-threaded."""
    indices = [tasks.task_indices(i % len(tasks))[1].reshape(-1) for i in range(repeats)]
    plain = ImageTransform(IMAGENET_MEAN, IMAGENET_STD, augment=False)
    augmenting = ImageTransform(IMAGENET_MEAN, IMAGENET_STD, augment=True)

    def timed(step) -> float:
        began = time.perf_counter()
        for idx in indices:
            step(idx)
        return (time.perf_counter() - began) / repeats * 1e3

    gather = timed(lambda idx: torch.from_numpy(flat.images[idx]))
    gathered = {id(idx): torch.from_numpy(flat.images[idx]) for idx in indices}
    to_float = timed(lambda idx: plain(gathered[id(idx)]))
    augmented = timed(lambda idx: augmenting(gathered[id(idx)]))
    return {"gather_ms": gather, "float_normalise_ms": to_float, "augment_ms": augmented - to_float}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per figure")
    parser.add_argument("--images-per-class", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64 * args.images_per_class, 84, 84, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(64), args.images_per_class)
    common = {"num_workers": args.num_workers, "threads": torch.get_num_threads()}

    for augment in (False, True):
        flat = FlatDataset(images, labels, ImageTransform(IMAGENET_MEAN, IMAGENET_STD, augment=augment))
        tasks = TaskDataset(flat, n_ways=N_WAYS, n_shots=N_SHOTS, n_queries=N_QUERIES, seed=0)
        loader = torch.utils.data.DataLoader(tasks, batch_size=None, shuffle=True, num_workers=args.num_workers)
        rate = throughput(loader, lambda task: 1, args.seconds)
        print(json.dumps({"bench": "tasks_per_s", "augment": augment, "n_ways": N_WAYS, "n_shots": N_SHOTS,
                          "n_queries": N_QUERIES, "image_size": 84, **common, "value": round(rate, 1)}), flush=True)

    flat = FlatDataset(images, labels, ImageTransform(IMAGENET_MEAN, IMAGENET_STD, augment=True))
    loader = torch.utils.data.DataLoader(flat, batch_size=BATCH, shuffle=True, num_workers=args.num_workers,
                                         drop_last=True)
    rate = throughput(loader, lambda batch: len(batch[1]), args.seconds)
    print(json.dumps({"bench": "images_per_s", "augment": True, "batch_size": BATCH, "image_size": 84, **common,
                      "value": round(rate, 1)}), flush=True)

    torch.set_num_threads(1)
    tasks = TaskDataset(flat, n_ways=N_WAYS, n_shots=N_SHOTS, n_queries=N_QUERIES, seed=0)
    stages = profile(flat, tasks)
    print(json.dumps({"bench": "profile", "images_per_task": N_WAYS * (N_SHOTS + N_QUERIES), "threads": 1,
                      **{k: round(v, 2) for k, v in stages.items()}}), flush=True)


if __name__ == "__main__":
    main()
