"""Image data with a label hierarchy, for MAXL: images plus one label column per level, coarse to fine.

A level is named by its number of classes (CIFAR-100: 3, 10, 20, 100); a subset (`dataset.classes`) keeps the
names of the full data. `load_hierarchical(cfg.dataset)` reads any `dataset=` whose config says
`supports: [maxl, ...]`; `check_config(cfg)` checks a maxl_train config's dataset keys before anything runs
and gives `auto` levels their values. `dataset=hier_file` reads your own files (docs/own_data.md).
"""
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from dataset import cifar100
from dataset.augment import Augmentation, to_normalised
from dataset.catalog import AUTO
from dataset.own_data import (ARRAY_SUFFIXES, CLASSES_STREAM, LEVELS_CSV, PER_CLASS_STREAM, cap_per_class,
                              check_per_class_and_seed, choose_classes, find_split, fit_images, ids_from_values,
                              read_array_labels, read_arrays, read_levels_csv, renumber, subset_rng, take)
from dataset.safe_pickle import load_pickle
from engine.errors import UserError

log = logging.getLogger("metalabel")

SPLITS = ("train", "test")
OWN_SUFFIXES = (*ARRAY_SUFFIXES, ".csv")
LEVEL_KEYS = ("primary_level", "auxiliary_level")


@dataclass
class HierarchicalData:
    name: str
    train_images: np.ndarray  # [N, H, W, 3] uint8
    train_labels: np.ndarray  # [N, L] int64, columns coarse to fine, ids 0..K-1
    test_images: np.ndarray
    test_labels: np.ndarray
    level_names: list[int] | None = None  # each level's classes in the full data (None: level_sizes)

    @property
    def level_sizes(self) -> list[int]:
        both = np.concatenate([self.train_labels, self.test_labels])
        return [int(column.max()) + 1 for column in both.T]

    def level_column(self, classes: int, key: str) -> int:
        """The label column of the level with `classes` classes (`key` names the config key for errors)."""
        names = self.level_names or self.level_sizes
        if classes not in names:
            raise UserError(f"{key}={classes} is not a level of dataset {self.name}: its levels have "
                            f"{', '.join(map(str, names))} classes")
        if names.count(classes) > 1:
            raise UserError(f"dataset {self.name} has several levels with {classes} classes: {key} is ambiguous")
        return names.index(classes)


class ImageDataset(torch.utils.data.Dataset):
    """uint8 HWC images held once in memory (or on the training device: `images_on`); a DataLoader fetches a
    batch at once (`__getitems__`: one gather, one batched augmentation, where the images are) as
    (image, targets[i], i) items. `augmentation` None: no augmentation (the test set)."""

    def __init__(self, images, targets, mean, std, augmentation: Augmentation | None):
        self.images = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        self.targets = torch.as_tensor(targets)
        self.mean, self.std, self.augmentation = tuple(mean), tuple(std), augmentation

    def __len__(self):
        return len(self.images)

    def __getitems__(self, indices):
        """Augmentation draws from torch's default CPU generator, which the engine seeds per batch."""
        images = self.images[torch.as_tensor(indices, device=self.images.device)]
        x = to_normalised(images, self.mean, self.std, self.augmentation)
        return [(x[b], self.targets[i], i) for b, i in enumerate(indices)]

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def image_bytes(self) -> int:
        return self.images.nbytes

    def images_on(self, device: torch.device) -> "ImageDataset":
        return ImageDataset(self.images.to(device), self.targets, self.mean, self.std, self.augmentation)


def image_dataset(images: np.ndarray, targets: np.ndarray, dataset_cfg, train: bool) -> ImageDataset:
    """Normalised with the dataset's mean and std; training: RandomCrop(size, padding) [+ horizontal flip]."""
    augmentation = Augmentation(int(dataset_cfg.crop_padding), bool(dataset_cfg.hflip)) if train else None
    return ImageDataset(images, targets, list(dataset_cfg.mean), list(dataset_cfg.std), augmentation)


# ---- the built-in sources: (train images, train labels, test images, test labels) ----------------------------
def _digits(image_size: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    small = torch.from_numpy(digits.images * (255.0 / 16.0)).float().unsqueeze(1)
    large = torch.nn.functional.interpolate(small, size=image_size, mode="bilinear", align_corners=False)
    images = large.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    labels = np.stack([(digits.target >= 5), digits.target], axis=1).astype(np.int64)
    split = train_test_split(images, labels, test_size=0.2, random_state=0, stratify=digits.target)
    return split[0], split[2], split[1], split[3]


def _cifar10(directory: Path, make_target: str):
    def read(names):
        batches = [load_pickle(directory / name, make_target) for name in names]
        images = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b["labels"]) for b in batches])
        return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.reshape(-1, 1).astype(np.int64)

    return (*read([f"data_batch_{i}" for i in range(1, 6)]), *read(["test_batch"]))


# ---- dataset=hier_file -------------------------------------------------------------------------------------
def _own_files(cfg) -> dict[str, Path]:
    """The train and test file (or folder) of `dataset=hier_file`, found on disk."""
    if OmegaConf.is_missing(cfg, "path") or cfg.path is None:
        raise UserError(f"dataset={cfg.name} needs its folder: add dataset.path=DIR (the folder holding the train "
                        f"and test files, see docs/own_data.md)")
    directory = Path(str(cfg.path)).expanduser()
    if not directory.is_dir():
        raise UserError(f"dataset.path={directory} is not a folder: give the folder holding the train and test files")
    files = {split: find_split(directory, cfg.get(f"{split}_file"), f"{split}_file", OWN_SUFFIXES) for split in SPLITS}
    for split, path in files.items():
        if path.is_dir():
            if not (path / LEVELS_CSV).is_file():
                raise UserError(f"dataset.{split}_file={path} is a folder without {LEVELS_CSV}: add "
                                f"{path / LEVELS_CSV} (columns file, then one per level) or name an .npz, .pkl or "
                                f".csv file")
            files[split] = path / LEVELS_CSV
        elif files[split].suffix.lower() not in OWN_SUFFIXES:
            raise UserError(f"dataset.{split}_file={path}: a {path.suffix or 'suffix-less'} file is not read; give an "
                            f"{', '.join(OWN_SUFFIXES)} file or a folder with {LEVELS_CSV}")
    return files


def _own_split(path: Path, with_images: bool):
    """(images or None, labels [N, L] as int ids or str values, level column names) of one split file."""
    if path.suffix.lower() == ".csv":
        files, names, values = read_levels_csv(path)
        return files, values, names
    if with_images:
        images, labels = read_arrays(path)
    else:
        images, labels = None, read_array_labels(path)
    return images, labels, [f"labels[:, {j}]" for j in range(labels.shape[1])]


def _own_levels(cfg, with_images: bool):
    """Both splits of `dataset=hier_file`: images (arrays or image files), labels as ids [N, L] numbered together,
    the names of each level's classes, and the level column names."""
    files = _own_files(cfg)
    read = {split: _own_split(path, with_images) for split, path in files.items()}
    widths = {split: labels.shape[1] for split, (_, labels, _) in read.items()}
    if len(set(widths.values())) > 1:
        raise UserError(f"dataset={cfg.name}: {files['train']} has {widths['train']} label levels, {files['test']} "
                        f"{widths['test']}: both splits need the same levels")
    columns = read["train"][2]
    levels, class_names = [], []  # per level: the ids of each split, the names of the ids
    for j, column in enumerate(columns):
        values = [read[split][1][:, j] for split in SPLITS]
        where = f"dataset {cfg.name}, level {j + 1} ({column})"
        if all(np.issubdtype(v.dtype, np.integer) for v in values):
            ids, names = values, None
        else:
            ids, names = ids_from_values([v.astype(str) for v in values], where)
        ids, names = renumber(ids, names, where, report=with_images)
        levels.append(ids)
        class_names.append(names)
    labels = {split: np.stack([ids[i] for ids in levels], axis=1).astype(np.int64) for i, split in enumerate(SPLITS)}
    if with_images:  # once per run: the check before the run reads the same labels
        log.info(f"dataset {cfg.name}: {len(labels['train'])} training images ({files['train']}), "
                 f"{len(labels['test'])} test images ({files['test']}); levels, coarse to fine: "
                 + ", ".join(f"{column} ({len(names)} classes)" for column, names in zip(columns, class_names)))
    return read["train"][0], labels["train"], read["test"][0], labels["test"], class_names


# ---- levels, subsets ---------------------------------------------------------------------------------------
def _resolve_auto(node, level_names: list[int]) -> None:
    """`auto` levels: primary = the next-to-finest level, auxiliary = the finest (one level: it, and none)."""
    defaults = level_names[-2:] if len(level_names) > 1 else [level_names[0], None]
    for key, default in zip(LEVEL_KEYS, defaults):
        if node.get(key) == AUTO:
            node[key] = default


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _subset(cfg, data: HierarchicalData, class_names: list[list[str]]) -> HierarchicalData:
    """`dataset.classes` (classes of the level `dataset.primary_level`, the same in both splits) and
    `dataset.per_class` (images per class of the finest level, in each split); ids renumbered after."""
    spec, per_class, seed = _plain(cfg.get("classes")), cfg.get("per_class"), cfg.get("seed", 0)
    if spec is None and per_class is None:
        return data
    labels = {"train": data.train_labels, "test": data.test_labels}
    images = {"train": data.train_images, "test": data.test_images}
    if spec is not None:
        if cfg.get("primary_level") in (None, AUTO):
            raise UserError("dataset.classes keeps classes of the primary level: set dataset.primary_level")
        column = data.level_column(cfg.primary_level, "dataset.primary_level")
        ids = np.unique(np.concatenate([labels[s][:, column] for s in SPLITS]))
        kept = choose_classes(ids, spec, class_names[column], subset_rng(seed, CLASSES_STREAM), "dataset.classes",
                              f"dataset {data.name}, primary level ({data.level_names[column]} classes)")
        for split in SPLITS:
            rows = np.flatnonzero(np.isin(labels[split][:, column], kept))
            labels[split], images[split] = labels[split][rows], take(images[split], rows)
    for split in SPLITS:
        rows = cap_per_class(labels[split][:, -1], per_class, subset_rng(seed, PER_CLASS_STREAM, split),
                             f"dataset {data.name}/{split}")
        if rows is not None:
            labels[split], images[split] = labels[split][rows], take(images[split], rows)
        if len(labels[split]) == 0:
            raise UserError(f"dataset {data.name}/{split}: the subset (dataset.classes={spec}) keeps no image: keep "
                            f"other classes")
    for j in range(labels["train"].shape[1]):
        ids, class_names[j] = renumber([labels[s][:, j] for s in SPLITS], class_names[j], data.name, report=False)
        for split, column_ids in zip(SPLITS, ids):
            labels[split][:, j] = column_ids
    return HierarchicalData(data.name, images["train"], labels["train"], images["test"], labels["test"],
                            data.level_names)


def _check_subset_keys(cfg) -> None:
    spec = _plain(cfg.get("classes"))
    if spec is not None and (isinstance(spec, bool) or not isinstance(spec, (int, list)) or spec == [] or (
            isinstance(spec, int) and spec < 1)):
        raise UserError(f"dataset.classes={spec}: give a number of classes or a list of class ids or names")
    check_per_class_and_seed(cfg)


def check_config(cfg) -> None:
    """What maxl_train checks before its run name is derived (nothing is trained or written yet): the subset keys
    are valid, hier_file's folder and files exist; `auto` levels get their values from the labels (a hier_file's
    labels are read; other datasets resolve them when loaded). Afterwards
    `dataset.primary_level` / `dataset.auxiliary_level` hold the levels the run uses (the subset's level)."""
    dataset = cfg.dataset
    _check_subset_keys(dataset)
    if dataset.source == "hier_file":
        _own_files(dataset)
        if AUTO in (cfg.get(key) for key in LEVEL_KEYS) or AUTO in (dataset.get(key) for key in LEVEL_KEYS):
            *_, class_names = _own_levels(dataset, with_images=False)
            level_names = [len(names) for names in class_names]
            _resolve_auto(dataset, level_names)
            _resolve_auto(cfg, level_names)
    for key in LEVEL_KEYS:
        if key in cfg and cfg.get(key) != AUTO:
            dataset[key] = cfg.get(key)


def load_hierarchical(cfg) -> HierarchicalData:
    """Read the dataset described by a `config/dataset/*.yaml` entry (generating `synthetic_hier` on first use),
    with ids 0..K-1 per level, `auto` levels resolved into `cfg`, the subset keys applied and, where the config
    has `image_size`, every image that size."""
    _check_subset_keys(cfg)
    source = cfg.source
    class_names = None
    if source == "cifar_pickles":
        path = Path(cfg.path)
        if cfg.get("generate") and not (path / "test").is_file():
            gen = cfg.generate
            cifar100.write_synthetic(path, gen.train_per_class, gen.test_per_class, gen.image_size, gen.seed)
        parts = [array for split in SPLITS for array in cifar100.read_split(path, split, cfg.make_target)]
    elif source == "torchvision_cifar10":
        parts = _cifar10(Path(cfg.path), cfg.make_target)
    elif source == "digits":
        parts = _digits(int(cfg.image_size))
    elif source == "hier_file":
        *parts, class_names = _own_levels(cfg, with_images=True)
    else:
        raise UserError(f"dataset {cfg.name}: unknown source '{source}'")
    data = HierarchicalData(cfg.name, *parts)
    if class_names is None:
        class_names = [[str(i) for i in range(size)] for size in data.level_sizes]
    data.level_names = [len(names) for names in class_names]
    _resolve_auto(cfg, data.level_names)
    data = _subset(cfg, data, class_names)
    if "image_size" in cfg:
        data.train_images = fit_images(data.train_images, cfg.image_size, f"dataset {cfg.name}/train")
        data.test_images = fit_images(data.test_images, cfg.image_size, f"dataset {cfg.name}/test")
    return data
