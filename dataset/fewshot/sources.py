"""`dataset=<name>` -> the sub-datasets of one split, read from the layout its config names (spec §3).

Keys of a MeLa dataset config (config/dataset/<name>.yaml): `source` picks a reader below; `path` is where the
files are (`alternative_paths`: other directory names the same files may have); `make_target` is the make
command that provides them; `mean`, `std`, `crop_padding`, `hflip` set the transform. Per source: `domains`
(meta-dataset pickles), `levels` (aircraft levels), `image_size` (custom image folders, digits), `class_split`
(digits), `generate` (synthetic_fs).
"""
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from omegaconf import OmegaConf
from torchvision.transforms.v2 import functional as TF

from dataset.fewshot.flat import FlatDataset
from dataset.fewshot.layouts import (MINI_IMAGENET_FILES, SPLITS, checked, read_image_folders, read_npy,
                                     read_npz_array, read_pickled_arrays)
from dataset.fewshot.synthetic import ensure_synthetic_fewshot
from dataset.fewshot.transforms import transform_from_config
from dataset.safe_pickle import load_pickle
from engine.errors import UserError

# mini-60 / tiered-780 (written by the ximagenet generator) call the validation split "valid".
XIMAGENET_SPLIT_NAMES = {"train": "train", "val": "valid", "test": "test"}
# Meta-dataset domains: directory under the data root and file prefix, `<dir>/<prefix>_<split>.pkl`.
METADATASET_DOMAINS = {"aircraft": ("aircraft", "aircraft"), "cu_birds": ("cu_birds", "cub"),
                       "vgg_flower": ("vgg_flower", "vgg")}
# H-aircraft: `aircraft_<level>_<split>.pkl` per level; the three-level file's columns are in this order.
AIRCRAFT_LEVELS = ("variant", "family", "maker")
TFRECORDS_FIX = "python dataset/tfrecords_to_pickle.py --dataset aircraft"


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


def _custom(cfg, split):
    directory = _directory(cfg)
    if (directory / MINI_IMAGENET_FILES[split]).is_file():
        return _mini_imagenet_pickles(cfg, split)
    if (directory / split).is_dir():
        return [(cfg.name, *read_image_folders(directory / split, int(cfg.image_size)))]
    raise UserError(f"dataset.path={directory} holds neither {MINI_IMAGENET_FILES[split]} nor a folder "
                    f"{split}/<class>/<images>: see the README's dataset=custom")


def _synthetic(cfg, split):
    generate = cfg.generate
    ensure_synthetic_fewshot(_directory(cfg), generate.classes, generate.images_per_class, generate.image_size,
                             generate.seed)
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
}


def _check(cfg, split: str) -> None:
    if "mela" not in list(cfg.get("supports") or []):
        from dataset.fewshot.config import mela_dataset_names

        raise UserError(f"dataset={cfg.name} has no MeLa (few-shot) view: choose one of "
                        f"{', '.join(mela_dataset_names())}")
    if split not in SPLITS:
        raise UserError(f"split '{split}' is not one of {', '.join(SPLITS)}")
    if cfg.source not in _READERS:
        raise UserError(f"dataset={cfg.name}: unknown source '{cfg.source}' (one of {', '.join(_READERS)})")


def _read(cfg, split: str):
    _check(cfg, split)
    return _READERS[cfg.source](cfg, split)


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
        images, labels = _aircraft_hierarchy(dataset_cfg, split)
    else:
        parts = _read(dataset_cfg, split)
        offsets = np.cumsum([0] + [int(part_labels.max() - part_labels.min()) + 1 for _, _, part_labels in parts])
        labels = np.concatenate([part_labels - part_labels.min() + offset
                                 for (_, _, part_labels), offset in zip(parts, offsets)])
        images = parts[0][1] if len(parts) == 1 else np.concatenate([images for _, images, _ in parts])
    return FlatDataset(images, labels, transform, rotate, name=f"{dataset_cfg.name}/{split}")
