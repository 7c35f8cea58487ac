"""Throughput of the data pipelines, as JSON lines on stdout.

    python bench/bench_data.py [--num-workers 4] [--seconds 5] [--images-per-class 100] [--repeats 5]

- augment_per_core: images/s in one thread of the batched augmentation (dataset/augment.py, with conversion and
  normalisation) and of the per-image torchvision path it replaced, measured alternately, medians of --repeats,
  and their ratio: MeLa's (84x84, RandomCrop pad 8 + flip + ColorJitter(0.4)) and MAXL's (32x32, RandomCrop pad 4
  + flip);
- tasks_per_s: few-shot tasks (5-way 5-shot 15-query, 84x84, no-replacement sampler) through a DataLoader with
  --num-workers workers, without and with augmentation;
- images_per_s: the flat training pipeline (batch 64, augmentation, shuffled) through a DataLoader;
- profile: where one task's time goes, in one thread of the main process: gather of the uint8 images, crop and
  flip, conversion to float, colour jitter, normalisation.
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

from dataset.augment import Augmentation, color_jitter_, crop_flip, normalise_, to_float, to_normalised  # noqa: E402
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


def per_image_reference(size: int, crop_padding: int, jitter: bool, mean, std):
    """The per-image torchvision v2 path the batched augmentation replaced: [B, H, W, 3] uint8 -> normalised
    float [B, 3, H, W] (normalised as one batch, as MeLa's was; MAXL's normalised each image, slower)."""
    from torchvision.transforms import v2

    steps = [v2.RandomCrop(size, padding=crop_padding), v2.RandomHorizontalFlip(),
             v2.ToDtype(torch.float32, scale=True)]
    augment = v2.Compose(steps + ([v2.ColorJitter(0.4, 0.4, 0.4)] if jitter else []))
    return lambda images: v2.functional.normalize(
        torch.stack([augment(image) for image in images.permute(0, 3, 1, 2)]), list(mean), list(std))


def batched(crop_padding: int, jitter: bool, mean, std):
    augmentation = Augmentation(crop_padding, hflip=True, jitter=0.4 if jitter else 0.0)
    return lambda images: to_normalised(images, mean, std, augmentation)


def compare_per_core(images: np.ndarray, crop_padding: int, jitter: bool, repeats: int, seconds: float,
                     batch: int = 100) -> dict:
    """Images/s in this thread of both paths on batches of `batch` images, measured alternately (each measurement
    at least `seconds` and 3 batches)."""
    paths = {"per_image": per_image_reference(images.shape[1], crop_padding, jitter, IMAGENET_MEAN, IMAGENET_STD),
             "batched": batched(crop_padding, jitter, IMAGENET_MEAN, IMAGENET_STD)}
    rng = np.random.default_rng(0)
    rates = {name: [] for name in paths}
    for _ in range(repeats):
        for name, path in paths.items():
            chunks = 0
            began = time.perf_counter()
            while chunks < 3 or time.perf_counter() - began < seconds:
                path(torch.from_numpy(images[rng.integers(len(images), size=batch)]))
                chunks += 1
            rates[name].append(chunks * batch / (time.perf_counter() - began))
    medians = {name: float(np.median(values)) for name, values in rates.items()}
    return {"per_image_images_per_s": round(medians["per_image"]), "batched_images_per_s": round(medians["batched"]),
            "ratio": round(medians["batched"] / medians["per_image"], 1)}


def profile(flat: FlatDataset, tasks: TaskDataset, repeats: int = 20) -> dict[str, float]:
    """Milliseconds per task of each stage of the batched path, single-threaded."""
    augmentation = Augmentation(8, hflip=True, jitter=0.4)
    generator = torch.Generator().manual_seed(0)
    stages = {name: 0.0 for name in ("gather_ms", "crop_flip_ms", "float_ms", "jitter_ms", "normalise_ms")}
    for i in range(repeats):
        indices = tasks.task_indices(i % len(tasks))[1].reshape(-1)
        times = [time.perf_counter()]
        images = torch.from_numpy(flat.images[indices])
        times.append(time.perf_counter())
        params = augmentation.draw(len(images), generator)
        images = crop_flip(images, params.offsets, params.flips, augmentation.crop_padding)
        times.append(time.perf_counter())
        x = to_float(images)
        times.append(time.perf_counter())
        x = color_jitter_(x, params.factors, params.orders)
        times.append(time.perf_counter())
        normalise_(x, IMAGENET_MEAN, IMAGENET_STD)
        times.append(time.perf_counter())
        for name, began, ended in zip(stages, times, times[1:]):
            stages[name] += (ended - began) / repeats * 1e3
    return stages


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per figure")
    parser.add_argument("--images-per-class", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="alternate measurements of each path (medians)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64 * args.images_per_class, 84, 84, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name, data, padding, jitter in (("mela", images, 8, True),
                                        ("maxl", images[:, :32, :32].copy(), 4, False)):
        print(json.dumps({"bench": "augment_per_core", "pipeline": name, "image_size": data.shape[1],
                          "crop_padding": padding, "jitter": jitter, "threads": 1,
                          **compare_per_core(data, padding, jitter, args.repeats, args.seconds / 10)}), flush=True)
    torch.set_num_threads(threads)
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
