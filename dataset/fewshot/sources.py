"""`dataset=<name>` -> the sub-datasets of one split, read from the layout its config names.

Keys of a MeLa dataset config (config/dataset/<name>.yaml): `source` picks a reader below; `path` is where the
files are (`alternative_paths`: other directory names the same files may have); `make_target` is the make
command that provides them; `mean`, `std`, `crop_padding`, `hflip` set the transform. Per source: `domains`
(meta-dataset pickles), `levels` (aircraft levels), `splits` / `pickle_path` (cifar_fewshot: cifar_fs, fc100),
`image_size` (custom, digits), `class_split` (digits), `generate` (synthetic_fs), `train_file` / `val_file` /
`test_file` / `val_classes` (custom). Any dataset may add the subset keys `classes`, `per_class`, `seed`
(`+dataset.classes=10`: custom lists them; see dataset/own_data.py). `check_config(cfg.dataset)` checks these
keys before a run starts.
"""
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from omegaconf import OmegaConf

from dataset.catalog import check_view
import dataset.fewshot.cifar_fewshot as cifar_fewshot
from dataset.fewshot.flat import FlatDataset
from dataset.fewshot.layouts import MINI_IMAGENET_FILES, SPLITS, checked, read_npy, read_npz_array, read_pickled_arrays
from dataset.fewshot.synthetic import ensure_synthetic_fewshot
from dataset.fewshot.transforms import transform_from_config
from dataset.own_data import (ARRAY_SUFFIXES, CARVE_STREAM, CLASSES_STREAM, PER_CLASS_STREAM, cap_per_class,
                              check_per_class_and_seed, choose_classes, find_split, fit_images, list_class_folders,
                              read_arrays, renumber, shown, subset_rng, take)
from dataset.safe_pickle import load_pickle
from engine.errors import UserError

log = logging.getLogger("metalabel")

# mini-60 / tiered-780 (written by the ximagenet generator) call the validation split "valid".
XIMAGENET_SPLIT_NAMES = {"train": "train", "val": "valid", "test": "test"}
# Meta-dataset domains: directory under the data root and file prefix, `<dir>/<prefix>_<split>.pkl`.
METADATASET_DOMAINS = {"aircraft": ("aircraft", "aircraft"), "cu_birds": ("cu_birds", "cub"),
                       "vgg_flower": ("vgg_flower", "vgg")}
# H-aircraft: `aircraft_<level>_<split>.pkl` per level; the three-level file's columns are in this order.
AIRCRAFT_LEVELS = ("variant", "family", "maker")
TFRECORDS_FIX = "python dataset/tfrecords_to_pickle.py --dataset aircraft"
# custom without a val split: the share of the training classes carved as val (when dataset.val_classes is null).
CARVED_VAL_SHARE = 0.2


class SubDataset(NamedTuple):
    name: str  # e.g. miniImageNet, aircraft, cub, vgg, aircraft_variant
    flat: FlatDataset


# ---- readers: (config, split) -> [(sub-dataset name, images, labels)] -------------------------------------------
def _directory(cfg) -> Path:
    if OmegaConf.is_missing(cfg, "path") or cfg.path is None:
        raise UserError(f"dataset={cfg.name} needs its directory: add dataset.path=DIR")
    return Path(str(cfg.path)).expanduser()


def _mini_imagenet_pickles(cfg, split):
    images, labels = read_pickled_arrays(_directory(cfg) / MINI_IMAGENET_FILES[split], cfg.make_target)
    return [(cfg.name, images, labels)]


def _tiered_npz(cfg, split):
    directory = _directory(cfg)
    images_path, labels_path = directory / f"{split}_images.npz", directory / f"{split}_labels.pkl"
    images = read_npz_array(images_path, "images", cfg.make_target)
    content = load_pickle(labels_path, cfg.make_target)
    # RFS files say `labels`; MetaOptNet's older files only `label_specific` (the same fine-grained ids).
    key = next((k for k in ("labels", "label_specific") if isinstance(content, dict) and k in content), None)
    if key is None:
        raise UserError(f"{labels_path}: expected a dict with 'labels' (download it again: make {cfg.make_target})")
    images, labels = checked(images, content[key], images_path)
    return [(cfg.name, images, labels)]


def _ximagenet_npy(cfg, split):
    stem = XIMAGENET_SPLIT_NAMES[split]
    candidates = [_directory(cfg), *(Path(str(p)).expanduser() for p in cfg.alternative_paths)]
    directory = next((d for d in candidates if (d / f"{stem}_images.npy").exists()), None)
    if directory is None:
        others = ", ".join(str(d) for d in candidates[1:])
        raise UserError(f"missing data file {candidates[0] / f'{stem}_images.npy'} (nor in {others}) "
                        f"(run `make {cfg.make_target}`)")
    images = read_npy(directory / f"{stem}_images.npy", cfg.make_target)
    labels = read_npy(directory / f"{stem}_labels.npy", cfg.make_target, memory_map=False)
    images, labels = checked(images, labels, directory / f"{stem}_images.npy")
    return [(cfg.name, images, labels)]


def _metadataset_pickles(cfg, split):
    domains = list(cfg.domains)
    unknown = [d for d in domains if d not in METADATASET_DOMAINS]
    if unknown or not domains:
        raise UserError(f"dataset.domains={domains}: choose one or more of {', '.join(METADATASET_DOMAINS)}")
    parts = []
    for domain in domains:
        folder, prefix = METADATASET_DOMAINS[domain]
        images, labels = read_pickled_arrays(_directory(cfg) / folder / f"{prefix}_{split}.pkl", cfg.make_target)
        if labels.ndim == 2:  # an aircraft file the original converter overwrote with [variant, family, maker]
            labels = labels[:, 0]
        parts.append((prefix, images, labels))
    return parts


def _aircraft_level_names(cfg) -> list[str]:
    levels = list(cfg.levels)
    if not levels or any(level not in AIRCRAFT_LEVELS for level in levels) or len(set(levels)) < len(levels):
        raise UserError(f"dataset.levels={levels}: choose distinct levels among {', '.join(AIRCRAFT_LEVELS)}")
    return levels


def _aircraft_levels(cfg, split):
    return [(f"aircraft_{level}",
             *read_pickled_arrays(_directory(cfg) / f"aircraft_{level}_{split}.pkl", cfg.make_target))
            for level in _aircraft_level_names(cfg)]


def _custom_file(cfg, directory: Path, split: str) -> Path | None:
    """The file or folder `dataset.<split>_file` names; None for a val split to carve (`val_file` null, or the
    default `val` absent). The default names also find miniImageNet's pickle of the split."""
    key = f"{split}_file"
    value = cfg.get(key)
    if split == "val" and value is None:
        return None
    legacy = directory / MINI_IMAGENET_FILES[split] if value == split else None
    path = find_split(directory, value, key, ARRAY_SUFFIXES, fallback=legacy, optional=split == value == "val")
    if path is not None and not path.is_dir() and path.suffix.lower() not in ARRAY_SUFFIXES:
        raise UserError(f"dataset.{key}={path}: a {path.suffix or 'suffix-less'} file is not read; give a folder of "
                        f"class folders or an {', '.join(ARRAY_SUFFIXES)} file")
    return path


def _read_custom(path: Path):
    """(images or image files, labels [N] numbered 0..K-1, class names) of a folder of class folders or an array
    file (its ids renumbered if they have gaps, logged; the names are the ids of the file)."""
    if path.is_dir():
        return list_class_folders(path)
    images, labels = read_arrays(path)
    if labels.shape[1] != 1:
        raise UserError(f"{path}: 'labels' has {labels.shape[1]} columns; few-shot data needs one class id per image")
    [labels], names = renumber([labels[:, 0]], None, f"{path}")
    return images, labels, names


def _val_classes(cfg) -> int | None:
    count = cfg.get("val_classes")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise UserError(f"dataset.val_classes={count}: give a number of classes (at least 1) or null (20% of the "
                        f"training classes)")
    return count


def _carved_val_classes(cfg, labels: np.ndarray, names: list[str], source: Path) -> np.ndarray:
    """The training classes a carved val split takes: `dataset.val_classes` of them (null: 20%, rounded, at least
    one), drawn with `dataset.seed`."""
    ids = np.unique(labels)
    count = _val_classes(cfg)
    if count is None:
        count = max(1, round(CARVED_VAL_SHARE * len(ids)))
    if len(ids) < 2 or count >= len(ids):
        raise UserError(f"dataset.val_classes={cfg.get('val_classes')}: carving a val split from the {len(ids)} "
                        f"classes of {source} needs 1 to {len(ids) - 1} of them; add a val split (dataset.val_file)")
    carved = np.sort(subset_rng(cfg.get("seed", 0), CARVE_STREAM).choice(ids, count, replace=False))
    log.info(f"dataset {cfg.name}: no val split (dataset.val_file={cfg.get('val_file')}): {count} of the {len(ids)} "
             f"training classes of {source} form it (dataset.val_classes, drawn with dataset.seed="
             f"{cfg.get('seed', 0)}), {len(ids) - count} stay for training; val classes: "
             f"{shown(names[i] for i in carved)}")
    return carved


def _custom(cfg, split):
    directory = _directory(cfg)
    val_file = _custom_file(cfg, directory, "val")
    if split == "test" or val_file is not None:
        path = val_file if split == "val" else _custom_file(cfg, directory, split)
        return [(cfg.name, *_read_custom(path))]
    train_file = _custom_file(cfg, directory, "train")
    images, labels, names = _read_custom(train_file)
    carved = np.isin(labels, _carved_val_classes(cfg, labels, names, train_file))
    rows = np.flatnonzero(carved if split == "val" else ~carved)
    return [(cfg.name, take(images, rows), labels[rows], names)]


def _synthetic(cfg, split):
    generate = cfg.generate
    ensure_synthetic_fewshot(_directory(cfg), generate.classes, generate.images_per_class, generate.image_size,
                             generate.seed, generate.get("kind", "patterns"))
    return _mini_imagenet_pickles(cfg, split)


def _digits(cfg, split):
    from sklearn.datasets import load_digits

    class_split = {s: [int(c) for c in cfg.class_split[s]] for s in SPLITS}
    every = sum(class_split.values(), [])
    if len(set(every)) != len(every) or not set(every) <= set(range(10)) or not all(class_split.values()):
        raise UserError(f"dataset.class_split={class_split}: give each split distinct digits 0-9, none shared")
    digits = load_digits()
    keep = np.isin(digits.target, class_split[split])
    small = torch.from_numpy(digits.images[keep] * (255.0 / 16.0)).float().unsqueeze(1)  # values 0..16
    size = int(cfg.image_size)
    from torchvision.transforms.v2 import functional as TF  # imported when first needed

    large = TF.resize(small, [size, size], antialias=False).round().clamp(0, 255).to(torch.uint8)
    images = large.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()
    return [(cfg.name, images, digits.target[keep])]


_READERS = {
    "mini_imagenet_pickles": _mini_imagenet_pickles,
    "tiered_npz": _tiered_npz,
    "ximagenet_npy": _ximagenet_npy,
    "metadataset_pickles": _metadataset_pickles,
    "aircraft_levels": _aircraft_levels,
    "custom": _custom,
    "synthetic_fs": _synthetic,
    "digits": _digits,
    "cifar_fewshot": cifar_fewshot.read,  # cifar_fs, fc100: the CIFAR-100 archive or the MetaOptNet pickles
}


def _check(cfg, split: str) -> None:
    check_view(cfg, "mela", "the MeLa scripts")
    if split not in SPLITS:
        raise UserError(f"split '{split}' is not one of {', '.join(SPLITS)}")
    if cfg.source not in _READERS:
        raise UserError(f"dataset={cfg.name}: unknown source '{cfg.source}' (one of {', '.join(_READERS)})")
    _check_subset_keys(cfg)


def _split_classes(cfg, split: str):
    """The `dataset.classes` entry of a split: a count for every split, or a {split: count | list} mapping."""
    spec = cfg.get("classes")
    spec = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
    return spec.get(split) if isinstance(spec, dict) else spec


def _check_subset_keys(cfg) -> None:
    spec = cfg.get("classes")
    spec = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
    entries = spec.values() if isinstance(spec, dict) else [spec]
    if isinstance(spec, list) or (isinstance(spec, dict) and not set(spec) <= set(SPLITS)) or any(
            isinstance(e, bool) or not (e is None or isinstance(e, (int, list))) or e == [] or (
                isinstance(e, int) and e < 1) for e in entries):
        raise UserError(f"dataset.classes={spec}: give a number of classes per split, or per split a number or a "
                        f"list of class names/ids, e.g. dataset.classes={{train:[cat,dog,emu],val:2}}")
    check_per_class_and_seed(cfg)


def _finish(cfg, split: str, name: str, images, labels: np.ndarray, class_names: list[str] | None = None):
    """A sub-dataset as it is used: the subset keys applied (classes of the first label column), ids 0..K-1
    where the data is the user's own or a subset (renumbered quietly: the user's own gaps were logged when read),
    every image `dataset.image_size` where the config has one."""
    where = f"dataset {name}/{split}"
    seed, spec = cfg.get("seed", 0), _split_classes(cfg, split)
    classes = labels if labels.ndim == 1 else labels[:, 0]
    rows = None
    if spec is not None:
        ids = np.unique(classes)
        names = class_names or [str(i) for i in range(int(ids[-1]) + 1)]
        kept = choose_classes(ids, spec, names, subset_rng(seed, CLASSES_STREAM, split), "dataset.classes", where)
        rows = np.flatnonzero(np.isin(classes, kept))
    capped = cap_per_class(classes if rows is None else classes[rows], cfg.get("per_class"),
                           subset_rng(seed, PER_CLASS_STREAM, split), where)
    if capped is not None:
        rows = capped if rows is None else rows[capped]
    images, labels = take(images, rows), labels if rows is None else labels[rows]
    if rows is not None or cfg.source == "custom":
        columns = [labels] if labels.ndim == 1 else list(labels.T)
        columns = [renumber([column], class_names if j == 0 else None, where, report=False)[0][0]
                   for j, column in enumerate(columns)]
        labels = columns[0] if labels.ndim == 1 else np.stack(columns, axis=1)
    if "image_size" in cfg:
        images = fit_images(images, cfg.image_size, where)
    return name, images, labels


def _read(cfg, split: str):
    _check(cfg, split)
    return [_finish(cfg, split, *part) for part in _READERS[cfg.source](cfg, split)]


def check_config(dataset_cfg) -> None:
    """What the MeLa scripts check before a run's name is derived (nothing is read or written yet but file names):
    the dataset has a MeLa view and a known source, the subset keys are valid, and `custom`'s folder and split
    files exist (a val split to carve is fine)."""
    _check(dataset_cfg, "train")
    if dataset_cfg.source == "custom":
        directory = _directory(dataset_cfg)
        for split in SPLITS:
            _custom_file(dataset_cfg, directory, split)
        _val_classes(dataset_cfg)
    if dataset_cfg.source == "cifar_fewshot":
        cifar_fewshot.check_config(dataset_cfg)


# ---- the API ----------------------------------------------------------------------------------------------------
def load_split(dataset_cfg, split: str, *, augment: bool = False, rotate: bool = False) -> list[SubDataset]:
    """The sub-datasets of `split` (train / val / test): one for most datasets, one per domain for mixed and
    one per label level for h_aircraft. Labels start at 0 in each; `augment` (data_aug) and `rotate` (x4
    rotation classes) set the transform."""
    transform = transform_from_config(dataset_cfg, augment)
    return [SubDataset(name, FlatDataset(images, labels, transform, rotate, name=f"{name}/{split}"))
            for name, images, labels in _read(dataset_cfg, split)]


def _aircraft_hierarchy(cfg, split) -> tuple[np.ndarray, np.ndarray]:
    """Images with one label column per level of `cfg.levels`, from `aircraft_hierarchy_<split>.pkl`, or from
    `aircraft_<split>.pkl` where the original converter left the three columns there."""
    directory = _directory(cfg)
    path = directory / f"aircraft_hierarchy_{split}.pkl"
    if not path.is_file() and (directory / f"aircraft_{split}.pkl").is_file():
        path = directory / f"aircraft_{split}.pkl"
    if not path.is_file():
        raise UserError(f"missing data file {path} (run `make {cfg.make_target}`, or `{TFRECORDS_FIX}` on "
                        f"meta-dataset's TFRecords)")
    images, labels = read_pickled_arrays(path, cfg.make_target)
    if labels.ndim != 2 or labels.shape[1] != len(AIRCRAFT_LEVELS):
        raise UserError(f"{path} has one label per image, the three-head set needs [variant, family, maker]: "
                        f"write aircraft_hierarchy_{split}.pkl with `{TFRECORDS_FIX}`")
    return images, labels[:, [AIRCRAFT_LEVELS.index(level) for level in _aircraft_level_names(cfg)]]


def load_supervised_set(dataset_cfg, split: str, *, augment: bool = False, rotate: bool = False) -> FlatDataset:
    """What supervised training on true labels (sup_baseline) reads: one flat set of the whole split.

    h_aircraft: the images once, labels [N, L] with one column per level of `dataset.levels` (a multi-head
    classifier; `n_cls` is then a tuple). Otherwise the sub-datasets one after the other with their labels offset
    so that classes of different domains stay apart (mixed: aircraft 0..69, cub 70..209, vgg 210..280).
    """
    transform = transform_from_config(dataset_cfg, augment)
    if dataset_cfg.source == "aircraft_levels":
        _check(dataset_cfg, split)
        _, images, labels = _finish(dataset_cfg, split, dataset_cfg.name, *_aircraft_hierarchy(dataset_cfg, split))
    else:
        parts = _read(dataset_cfg, split)
        offsets = np.cumsum([0] + [int(part_labels.max() - part_labels.min()) + 1 for _, _, part_labels in parts])
        labels = np.concatenate([part_labels - part_labels.min() + offset
                                 for (_, _, part_labels), offset in zip(parts, offsets)])
        images = parts[0][1] if len(parts) == 1 else np.concatenate([images for _, images, _ in parts])
    return FlatDataset(images, labels, transform, rotate, name=f"{dataset_cfg.name}/{split}")
