"""What the labeler costs inside learn_labeler's step, one JSON line per measurement:

    python bench/bench_labeler.py [--scale mini,tiered] [--batches 2] [--batch-size 32] [--quick]

labeler   per scale, on synthetic 640-d features of the dataset's size (miniImageNet train: 38,400 images, 64
          classes; tieredImageNet train: 448,695 images, 351 classes), 5-way 5+15 tasks of the no-replacement
          partition (all of it, as learn_labeler by default), K=400, std_factor=3.5: the seconds of the class means,
          of the whole clustering (every pass until K is stable) and of the final assignment, measured.
resnet12  images per second of a full-width ResNet-12 at 84x84 in float32 on this machine, measured over
          `--batches` batches after a warm-up one: feature extraction (eval, inference mode) and supervised
          training (forward, cross-entropy, backward, SGD step).
step      per scale, an ESTIMATE of the rest of learn_labeler's step from those rates: encoding every train image
          once, and 50 epochs of training on the inferred labels with rotations (4 items per image, every image
          labelled); validation is left out, so the labeler's share is an upper bound.
--quick shrinks everything (a smoke run; its figures mean nothing).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataset.fewshot import FlatDataset, TaskDataset  # noqa: E402
from methods.labeler import assign_tasks, class_means, cluster  # noqa: E402
from methods.supervised import build_classifier  # noqa: E402
from models import create_model  # noqa: E402

SCALES = {"mini": (38_400, 64), "tiered": (448_695, 351)}  # train images, classes
EPOCHS, ROTATIONS = 50, 4  # learn_labeler's defaults: 50 epochs, sup_rotate_aug


def synthetic_features(n_images: int, n_classes: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Gaussian classes (one random mean per class, noise 3x the means' scale): features [M, d] float32, labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_images) * n_classes // n_images  # classes of (nearly) equal size, in order
    features = torch.randn(n_classes, dim, generator=g)[labels]
    features += 3 * torch.randn(n_images, dim, generator=g)
    return features, labels.numpy()


def seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_labeler(scale: str, n_images: int, n_classes: int, args) -> dict:
    features, labels = synthetic_features(n_images, n_classes, args.feat_dim)
    flat = FlatDataset(np.zeros((n_images, 1, 1, 3), dtype=np.uint8), labels, transform=None, name=scale)
    tasks = TaskDataset(flat, n_ways=5, n_shots=5, n_queries=15, shape="flat", no_replacement=True, seed=0)
    indices = torch.as_tensor(np.stack([tasks.task_indices(i)[1] for i in range(len(tasks))]))
    means_s, keys = seconds(lambda: class_means(features, indices))
    cluster_s, result = seconds(lambda: cluster(keys, args.K, args.std_factor, seed=0))
    assign_s, (_, accepted) = seconds(lambda: assign_tasks(keys, result.centroids))
    return {"bench": "labeler", "scale": scale, "images": n_images, "classes": n_classes, "tasks": len(tasks),
            "K": args.K, "feat_dim": args.feat_dim, "passes": len(result.passes),
            "final_centroids": len(result.centroids), "accepted_tasks": round(accepted.float().mean().item(), 3),
            "class_means_s": round(means_s, 3), "cluster_s": round(cluster_s, 3),
            "seconds_per_pass": round(cluster_s / len(result.passes), 3), "assign_s": round(assign_s, 3),
            "labeler_s": round(means_s + cluster_s + assign_s, 3)}


def bench_resnet12(args) -> dict:
    torch.manual_seed(0)
    model = build_classifier(create_model("resnet12", width_mult=args.width), 64, rotate_aug=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    targets = torch.randint(0, 64 * ROTATIONS, (args.batch_size,))

    def train_step():
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(images), targets).backward()
        optimizer.step()

    def feature_step():
        model.eval()
        with torch.inference_mode():
            model.backbone(images)

    rates = {}
    for name, step in (("features", feature_step), ("train", train_step)):
        step()  # warm-up
        elapsed, _ = seconds(lambda: [step() for _ in range(args.batches)])
        rates[f"{name}_images_per_s"] = round(args.batches * args.batch_size / elapsed, 2)
    return {"bench": "resnet12", "image_size": args.image_size, "width": args.width, "batch_size": args.batch_size,
            "threads": torch.get_num_threads(), **rates}


def step_estimate(labeler: dict, rates: dict) -> dict:
    features_s = labeler["images"] / rates["features_images_per_s"]
    training_s = EPOCHS * ROTATIONS * labeler["images"] / rates["train_images_per_s"]
    total = labeler["labeler_s"] + features_s + training_s
    return {"bench": "step", "scale": labeler["scale"], "estimated": True, "labeler_s": labeler["labeler_s"],
            "features_s_estimate": round(features_s), "training_s_estimate": round(training_s),
            "labeler_share": float(f"{labeler['labeler_s'] / total:.2g}")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="mini,tiered", help="comma-separated: mini, tiered")
    parser.add_argument("--batches", type=int, default=2, help="timed ResNet-12 batches of each kind")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--width", type=float, default=1.0, help="ResNet-12 width multiplier")
    parser.add_argument("--feat-dim", type=int, default=640)
    parser.add_argument("--K", type=int, default=400)
    parser.add_argument("--std-factor", type=float, default=3.5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = parser.parse_args(argv)
    scales = [s for s in args.scale.split(",") if s]
    unknown = [s for s in scales if s not in SCALES]
    if unknown or not scales:
        parser.error(f"--scale {args.scale}: choose among {', '.join(SCALES)}")
    sizes = {s: SCALES[s] for s in scales}
    if args.quick:
        sizes = {s: (n_classes * 40, n_classes) for s, (_, n_classes) in sizes.items()}
        args.feat_dim, args.K, args.batches, args.batch_size, args.image_size, args.width = 16, 40, 1, 4, 32, 0.125
    rates = bench_resnet12(args)
    print(json.dumps(rates), flush=True)
    for scale, (n_images, n_classes) in sizes.items():
        labeler = bench_labeler(scale, n_images, n_classes, args)
        print(json.dumps(labeler), flush=True)
        print(json.dumps(step_estimate(labeler, rates)), flush=True)


if __name__ == "__main__":
    main()
