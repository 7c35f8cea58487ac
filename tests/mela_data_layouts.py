"""Small generated copies of the original MeLa on-disk layouts, for the data-layer tests."""
import pickle
from pathlib import Path

import numpy as np

from dataset.fewshot.layouts import MINI_IMAGENET_FILES

SPLITS = ("train", "val", "test")
SIZE = 12  # image side: small keeps the tests fast; the loaders take any size


def split_arrays(split: str, classes: dict, per_class: int, seed: int = 0, first_label: dict | None = None):
    """Random uint8 images and labels of one split; labels are global ids starting at `first_label[split]`."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    first = (first_label or {"train": 0, "val": 100, "test": 200})[split]
    labels = np.repeat(np.arange(first, first + classes[split]), per_class)
    images = rng.integers(0, 256, (len(labels), SIZE, SIZE, 3), dtype=np.uint8)
    return images, labels


def write_mini_imagenet(directory: Path, classes: dict, per_class: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        images, labels = split_arrays(split, classes, per_class)
        with open(directory / MINI_IMAGENET_FILES[split], "wb") as handle:
            pickle.dump({"data": images, "labels": labels.tolist()}, handle, protocol=4)


def write_tiered(directory: Path, classes: dict, per_class: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        images, labels = split_arrays(split, classes, per_class)
        np.savez(directory / f"{split}_images.npz", images=images)
        with open(directory / f"{split}_labels.pkl", "wb") as handle:
            pickle.dump({"labels": labels.tolist(), "label_general": [0] * len(labels)}, handle, protocol=2)


def write_ximagenet(directory: Path, classes: dict, per_class: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split, stem in (("train", "train"), ("val", "valid"), ("test", "test")):
        images, labels = split_arrays(split, classes, per_class)
        np.save(directory / f"{stem}_images.npy", images)
        np.save(directory / f"{stem}_labels.npy", labels)


def write_metadataset(data_dir: Path, classes: dict, per_class: int, aircraft_three_columns: bool = False) -> None:
    """aircraft/aircraft_<split>.pkl, cu_birds/cub_<split>.pkl, vgg_flower/vgg_<split>.pkl with (N, 1) labels."""
    for seed, (folder, prefix) in enumerate((("aircraft", "aircraft"), ("cu_birds", "cub"), ("vgg_flower", "vgg"))):
        (data_dir / folder).mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            images, labels = split_arrays(split, classes, per_class, seed=seed)
            labels = labels[:, None]
            if aircraft_three_columns and prefix == "aircraft":
                labels = np.concatenate([labels, labels // 2, labels // 3], axis=1)
            with open(data_dir / folder / f"{prefix}_{split}.pkl", "wb") as handle:
                pickle.dump({"data": images, "labels": labels}, handle, protocol=4)


def write_h_aircraft(directory: Path, classes: dict, per_class: int, hierarchy: bool = True) -> None:
    """aircraft_{variant,family,maker}_<split>.pkl (+ aircraft_hierarchy_<split>.pkl); family = variant // 2 and
    maker = variant // 3, so the coarser levels have fewer classes."""
    directory.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        images, variant = split_arrays(split, classes, per_class)
        levels = {"variant": variant, "family": variant // 2, "maker": variant // 3}
        for level, labels in levels.items():
            with open(directory / f"aircraft_{level}_{split}.pkl", "wb") as handle:
                pickle.dump({"data": images, "labels": labels[:, None]}, handle, protocol=4)
        if hierarchy:
            with open(directory / f"aircraft_hierarchy_{split}.pkl", "wb") as handle:
                pickle.dump({"data": images, "labels": np.stack(list(levels.values()), axis=1)}, handle, protocol=4)
