"""Image data with a label hierarchy, for MAXL: images plus one label column per level, coarse to fine.

A level is named by its number of classes (CIFAR-100: 3, 10, 20, 100). `load_hierarchical(cfg.dataset)` reads
any `dataset=` whose config says `supports: [maxl, ...]`.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from dataset import cifar100
from dataset.safe_pickle import load_pickle
from engine.errors import UserError


@dataclass
class HierarchicalData:
    name: str
    train_images: np.ndarray  # [N, H, W, 3] uint8
    train_labels: np.ndarray  # [N, L] int64, columns coarse to fine
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def level_sizes(self) -> list[int]:
        both = np.concatenate([self.train_labels, self.test_labels])
        return [int(column.max()) + 1 for column in both.T]

    def level_column(self, classes: int, key: str) -> int:
        """The label column of the level with `classes` classes (`key` names the config key for errors)."""
        sizes = self.level_sizes
        if classes not in sizes:
            raise UserError(f"{key}={classes} is not a level of dataset {self.name}: its levels have "
                            f"{', '.join(map(str, sizes))} classes")
        if sizes.count(classes) > 1:
            raise UserError(f"dataset {self.name} has several levels with {classes} classes: {key} is ambiguous")
        return sizes.index(classes)


class ImageDataset(torch.utils.data.Dataset):
    """uint8 HWC images held once in memory; `__getitem__` gives (transformed image, targets[i], i)."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform):
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        self.targets = torch.as_tensor(targets)
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), self.targets[index], index


def image_transform(dataset_cfg, image_size: int, train: bool):
    """Training: RandomCrop(size, padding) [+ horizontal flip]; both: to float in [0,1], then Normalize."""
    steps = []
    if train:
        steps.append(v2.RandomCrop(image_size, padding=int(dataset_cfg.crop_padding)))
        if dataset_cfg.hflip:
            steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(dataset_cfg.mean), list(dataset_cfg.std))]
    return v2.Compose(steps)


def _digits() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    small = torch.from_numpy(digits.images * (255.0 / 16.0)).float().unsqueeze(1)
    large = torch.nn.functional.interpolate(small, size=32, mode="bilinear", align_corners=False)
    images = large.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    labels = np.stack([(digits.target >= 5), digits.target], axis=1).astype(np.int64)
    split = train_test_split(images, labels, test_size=0.2, random_state=0, stratify=digits.target)
    return split[0], split[2], split[1], split[3]


def _read_array_file(directory: Path, split: str, dataset: str):
    for suffix in (".npz", ".pkl", ".pickle"):
        path = directory / f"{split}{suffix}"
        if path.is_file():
            content = dict(np.load(path)) if suffix == ".npz" else load_pickle(path)
            break
    else:
        raise UserError(f"dataset {dataset}: no {directory}/{split}.npz (or .pkl): give dataset.path=DIR holding "
                        f"train and test files with 'data' and 'labels'")
    if "data" not in content or "labels" not in content:
        raise UserError(f"{path} must hold 'data' (N,H,W,3 uint8) and 'labels' (N,L ints); it has {sorted(content)}")
    images, labels = np.asarray(content["data"]), np.asarray(content["labels"])
    labels = labels.reshape(len(labels), -1)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise UserError(f"{path}: 'data' must be N,H,W,3 uint8 with one 'labels' row per image; "
                        f"got data {images.shape} {images.dtype}, labels {labels.shape}")
    return images, labels.astype(np.int64)


def _cifar10(directory: Path, make_target: str):
    def read(names):
        batches = [load_pickle(directory / name, make_target) for name in names]
        images = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b["labels"]) for b in batches])
        return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.reshape(-1, 1).astype(np.int64)

    return (*read([f"data_batch_{i}" for i in range(1, 6)]), *read(["test_batch"]))


def load_hierarchical(cfg) -> HierarchicalData:
    """Read the dataset described by a `config/dataset/*.yaml` entry (generating `synthetic_hier` on first use)."""
    if "maxl" not in cfg.supports:
        raise UserError(f"dataset={cfg.name} is a few-shot dataset without a label hierarchy; maxl_train.py takes "
                        f"cifar100, cifar10, synthetic_hier, digits or hier_file")
    source = cfg.source
    if source == "cifar_pickles":
        path = Path(cfg.path)
        if cfg.get("generate") and not (path / "test").is_file():
            gen = cfg.generate
            cifar100.write_synthetic(path, gen.train_per_class, gen.test_per_class, gen.image_size, gen.seed)
        parts = (*cifar100.read_split(path, "train", cfg.make_target), *cifar100.read_split(path, "test", cfg.make_target))
    elif source == "torchvision_cifar10":
        parts = _cifar10(Path(cfg.path), cfg.make_target)
    elif source == "digits":
        parts = _digits()
    elif source == "hier_file":
        path = Path(cfg.path)
        parts = (*_read_array_file(path, "train", cfg.name), *_read_array_file(path, "test", cfg.name))
    else:
        raise UserError(f"dataset {cfg.name}: unknown source '{source}'")
    return HierarchicalData(cfg.name, *parts)
