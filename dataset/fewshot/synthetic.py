"""`dataset=synthetic_fs` / `synthetic_hard_fs`: small generated few-shot datasets in the miniImageNet pickle layout
(tests, quick runs). `generate.kind` picks the images:
- `patterns` (synthetic_fs): each class a smooth random colour pattern, its images that pattern shifted by a few
  pixels, plus pixel noise. Easy: raw pixels or an untrained network already tell the classes apart.
- `motifs` (synthetic_hard_fs): each class a random binary 4x4 shape, drawn brighter at a random place of a noisy
  dark image. Only a learned, translation-invariant shape detector tells them apart (untrained: little above
  chance on new classes, trained: near 1), so a broken training shows.
Labels run on across the splits (train first), as miniImageNet's global ids do. The files are written once,
atomically; `generated_with.json` records the settings, and other settings regenerate them.
"""
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dataset.fewshot.layouts import MINI_IMAGENET_FILES, SPLITS
from dataset.safe_pickle import save_pickle
from engine.errors import UserError
from engine.workspace import written_atomically

PATTERN_CELLS = 4  # each class pattern is a 4x4 grid of random colours, smoothly upsampled
NOISE_STD = 24.0
MOTIF_SIZE = 4  # each motif class is a random 4x4 binary shape
MOTIF_BACKGROUND, MOTIF_CONTRAST, MOTIF_NOISE_STD = 64.0, 128.0, 16.0


def _class_images(rng: np.random.Generator, n_classes: int, per_class: int, size: int) -> np.ndarray:
    cells = torch.from_numpy(rng.uniform(0, 255, (n_classes, 3, PATTERN_CELLS, PATTERN_CELLS)).astype(np.float32))
    patterns = F.interpolate(cells, size=(size, size), mode="bilinear", align_corners=False).numpy()
    images = np.repeat(patterns, per_class, axis=0)
    max_shift = max(1, size // 8)
    for i, (dy, dx) in enumerate(rng.integers(-max_shift, max_shift + 1, (len(images), 2))):
        images[i] = np.roll(images[i], (dy, dx), axis=(1, 2))
    images += rng.normal(0, NOISE_STD, images.shape)
    return np.clip(images, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def _motif_images(rng: np.random.Generator, n_classes: int, per_class: int, size: int) -> np.ndarray:
    shapes = rng.random((n_classes, MOTIF_SIZE, MOTIF_SIZE)) < 0.5
    labels = np.repeat(np.arange(n_classes), per_class)
    images = MOTIF_BACKGROUND + rng.normal(0, MOTIF_NOISE_STD, (len(labels), size, size, 3))
    corners = rng.integers(0, size - MOTIF_SIZE + 1, (len(labels), 2))
    for image, shape, (y, x) in zip(images, shapes[labels], corners):
        image[y:y + MOTIF_SIZE, x:x + MOTIF_SIZE][shape] += MOTIF_CONTRAST
    return np.clip(images, 0, 255).round().astype(np.uint8)


GENERATORS = {"patterns": _class_images, "motifs": _motif_images}


def ensure_synthetic_fewshot(directory: Path, classes: dict, images_per_class: int, image_size: int,
                             seed: int, kind: str = "patterns") -> Path:
    """Write the three miniImageNet-layout pickles under `directory` unless they exist with these settings."""
    directory = Path(directory)
    if kind not in GENERATORS:
        raise UserError(f"dataset.generate.kind={kind} is not one of {', '.join(GENERATORS)}")
    settings = {"kind": kind, "classes": {split: int(classes[split]) for split in SPLITS},
                "images_per_class": int(images_per_class), "image_size": int(image_size), "seed": int(seed)}
    for key, value in (*((f"classes.{s}", n) for s, n in settings["classes"].items()),
                       ("images_per_class", settings["images_per_class"]), ("image_size", settings["image_size"])):
        if value < 1:
            raise UserError(f"dataset.generate.{key}={value} must be at least 1")
    if kind == "motifs" and settings["image_size"] < MOTIF_SIZE:
        raise UserError(f"dataset.generate.image_size={image_size} is smaller than the {MOTIF_SIZE}x{MOTIF_SIZE} "
                        f"motifs: set it to at least {MOTIF_SIZE}")
    stamp = directory / "generated_with.json"
    if (stamp.is_file() and json.loads(stamp.read_text()) == settings
            and all((directory / name).is_file() for name in MINI_IMAGENET_FILES.values())):
        return directory
    rng = np.random.default_rng(settings["seed"])
    first_label = 0
    for split in SPLITS:
        n = settings["classes"][split]
        images = GENERATORS[kind](rng, n, settings["images_per_class"], settings["image_size"])
        labels = np.repeat(np.arange(first_label, first_label + n), settings["images_per_class"])
        save_pickle(directory / MINI_IMAGENET_FILES[split], {"data": images, "labels": labels.tolist()})
        first_label += n
    with written_atomically(stamp) as tmp:
        tmp.write_text(json.dumps(settings, indent=2))
    return directory
