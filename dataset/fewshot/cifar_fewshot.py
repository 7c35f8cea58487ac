"""CIFAR-FS and FC100 (`dataset=cifar_fs`, `dataset=fc100`): few-shot splits of CIFAR-100, read straight from the
official python archive (`make download_cifar100`, the one `dataset=cifar100` reads), or from the pickles of the
MetaOptNet / RFS releases when only those are there.

The splits ship with the project as published (dataset/resources/cifar_fewshot/*.json): CIFAR-FS lists fine
classes (64 / 16 / 20), FC100 superclasses (12 / 4 / 4, so 60 / 20 / 20 fine classes). Classes are looked up by
name in the archive's `meta`, so an archive with other classes is refused, not relabelled silently. A split takes
every image of its classes from the archive's `train` and `test` files (600 per class), labelled 0..K-1 in the
archive's fine-class order. Keys: `splits` (cifar_fs | fc100), `path` (the cifar-100-python folder, read when its
`meta` is there; null: pickles only), `pickle_path` (the folder of `<prefix>_<split>.pickle`; null: none).
"""
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from dataset.fewshot.layouts import read_pickled_arrays
from dataset.safe_pickle import load_pickle
from engine.errors import UserError

log = logging.getLogger("metalabel")

RESOURCES = Path(__file__).resolve().parent.parent / "resources" / "cifar_fewshot"
ARCHIVE_FILES = ("train", "test")  # the archive's two image files; the few-shot splits take both
SIDE = 32


@dataclass(frozen=True)
class Benchmark:
    title: str
    level: str                    # "fine": the splits list fine classes; "coarse": superclasses
    pickle_prefix: str            # <prefix>_<split>.pickle of the MetaOptNet / RFS releases
    fine_classes: dict            # fine classes per split, as published


BENCHMARKS = {
    "cifar_fs": Benchmark("CIFAR-FS", "fine", "CIFAR_FS", {"train": 64, "val": 16, "test": 20}),
    "fc100": Benchmark("FC100", "coarse", "FC100", {"train": 60, "val": 20, "test": 20}),
}


def published_splits(benchmark: str) -> dict[str, list[str]]:
    """split -> the class names the benchmark's paper lists (fine classes, or FC100's superclasses)."""
    return json.loads((RESOURCES / f"{benchmark}_splits.json").read_text())


def cifar100_fine_names() -> list[str]:
    """The 100 fine classes in the archive's order (alphabetical): the ids MetaOptNet's pickles use."""
    return sorted(sum(published_splits("cifar_fs").values(), []))


def _benchmark(cfg) -> Benchmark:
    name = cfg.get("splits")
    if name not in BENCHMARKS:
        raise UserError(f"dataset.splits={name}: choose one of {', '.join(BENCHMARKS)} (the published splits)")
    return BENCHMARKS[name]


def _folder(cfg, key: str) -> Path | None:
    value = cfg.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise UserError(f"dataset.{key}={value}: give a folder, or null")
    return Path(value).expanduser()


def check_config(cfg) -> None:
    """The keys of `dataset=cifar_fs` / `fc100` (nothing is read)."""
    _benchmark(cfg)
    if _folder(cfg, "path") is None and _folder(cfg, "pickle_path") is None:
        raise UserError(f"dataset={cfg.name}: dataset.path (the cifar-100-python folder) and dataset.pickle_path "
                        f"are both null: give one")


# ---- the archive ------------------------------------------------------------------------------------------------
def _archive_file(path: Path, make_target: str | None):
    """Images [N, 32, 32, 3] uint8, fine and coarse labels [N] of one file of the archive."""
    batch = load_pickle(path, make_target)
    hint = f" (download it again: make {make_target})" if make_target else ""
    if not isinstance(batch, dict) or not {"data", "fine_labels", "coarse_labels"} <= set(batch):
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise UserError(f"{path}: expected CIFAR-100's dict with 'data', 'fine_labels' and 'coarse_labels', found "
                        f"{found}: not the CIFAR-100 python archive{hint}")
    data = np.asarray(batch["data"])
    fine, coarse = np.asarray(batch["fine_labels"]), np.asarray(batch["coarse_labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE:
        raise UserError(f"{path}: 'data' is {data.dtype} {list(data.shape)}, CIFAR-100 has uint8 [N, 3072] (32x32 "
                        f"RGB){hint}")
    if not (len(data) == len(fine) == len(coarse)) or fine.ndim != 1 or coarse.ndim != 1:
        raise UserError(f"{path}: {len(data)} images but {len(fine)} fine and {len(coarse)} coarse labels: the file "
                        f"is damaged{hint}")
    images = data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    return images, fine.astype(np.int64), coarse.astype(np.int64)


def _names(meta: dict, key: str, path: Path, make_target: str | None) -> list[str]:
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
        raise UserError(f"{path}: no '{key}' list: not the CIFAR-100 python archive (run `make {make_target}`)")
    return [n.decode("latin-1") if isinstance(n, bytes) else n for n in names]


@lru_cache(maxsize=2)
def _archive(directory: Path, make_target: str | None, stamp: tuple):
    """(images, fine labels, coarse labels, fine names, coarse names) of the whole archive, train then test;
    cached per process (a script reads three splits); `stamp`, the files' times and sizes, makes a new download read.
    """
    meta_path = directory / "meta"
    meta = load_pickle(meta_path, make_target)
    fine_names = _names(meta, "fine_label_names", meta_path, make_target)
    coarse_names = _names(meta, "coarse_label_names", meta_path, make_target)
    parts = [_archive_file(directory / name, make_target) for name in ARCHIVE_FILES]
    images, fine, coarse = (np.concatenate(column) for column in zip(*parts))
    for labels, names, what in ((fine, fine_names, "fine"), (coarse, coarse_names, "coarse")):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise UserError(f"{directory}: {what} labels outside the {len(names)} {what} classes of its meta file: "
                            f"the archive is damaged (run `make {make_target}`)")
    return np.ascontiguousarray(images), fine, coarse, fine_names, coarse_names


def _lookup(names: list[str], wanted: list[str], what: str, where: Path, title: str, split: str) -> list[int]:
    missing = [n for n in wanted if n not in names]
    if missing:
        raise UserError(f"{where}: no {what} class {', '.join(repr(n) for n in missing[:3])} of {title}'s {split} "
                        f"split among its {len(names)} {what} classes: not the CIFAR-100 archive (give the "
                        f"cifar-100-python folder: make download_cifar100)")
    return [names.index(n) for n in wanted]


def _from_archive(cfg, directory: Path, benchmark: Benchmark, split: str):
    files = [directory / name for name in ("meta", *ARCHIVE_FILES)]
    stamp = tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None for f in files)
    images, fine, coarse, fine_names, coarse_names = _archive(directory, cfg.get("make_target"), stamp)
    wanted = published_splits(cfg.splits)[split]
    if benchmark.level == "fine":
        ids = np.array(sorted(_lookup(fine_names, wanted, "fine", directory / "meta", benchmark.title, split)))
    else:
        supers = _lookup(coarse_names, wanted, "coarse", directory / "meta", benchmark.title, split)
        ids = np.unique(fine[np.isin(coarse, supers)])
    expected = benchmark.fine_classes[split]
    counts = np.bincount(fine, minlength=len(fine_names))[ids]
    if len(ids) != expected or (counts == 0).any():
        empty = [fine_names[i] for i, c in zip(ids, counts) if c == 0]
        found = f"no image of {', '.join(empty[:3])}" if empty else f"{len(ids)} fine classes"
        raise UserError(f"{directory}: {benchmark.title}'s {split} split has {expected} fine classes with images, "
                        f"the archive gives {found}: it is not the whole CIFAR-100 archive (run `make "
                        f"{cfg.get('make_target')}`)")
    rank = np.full(len(fine_names), -1)
    rank[ids] = np.arange(len(ids))
    rows = np.flatnonzero(rank[fine] >= 0)
    rows = rows[np.argsort(rank[fine[rows]], kind="stable")]  # class by class, train file then test file
    return images[rows], rank[fine[rows]], [fine_names[i] for i in ids]


# ---- the MetaOptNet / RFS pickles ---------------------------------------------------------------------------------
def _from_pickles(cfg, path: Path, benchmark: Benchmark, split: str):
    images, labels = read_pickled_arrays(path, None)
    if images.ndim != 4 or images.shape[1:] != (SIDE, SIDE, 3) or labels.ndim != 1:
        raise UserError(f"{path}: 'data' is {list(images.shape)} with labels {list(labels.shape)}; "
                        f"{benchmark.pickle_prefix} pickles hold [N, 32, 32, 3] images and one label each")
    ids, labels = np.unique(labels, return_inverse=True)
    expected = benchmark.fine_classes[split]
    if len(ids) != expected:
        raise UserError(f"{path}: {len(ids)} classes, {benchmark.title}'s {split} split has {expected}: not the "
                        f"{benchmark.title} {split} file (or a damaged one)")
    all_names = cifar100_fine_names()
    names = [str(i) for i in ids]
    if ids.min() >= 0 and ids.max() < len(all_names):
        names = [all_names[i] for i in ids]
        if benchmark.level == "fine" and set(names) != set(published_splits(cfg.splits)[split]):
            log.warning(f"{path}: its label ids are not the CIFAR-100 ids of {benchmark.title}'s {split} classes; "
                        f"the classes are used as they are (names shown are CIFAR-100's for those ids)")
    return np.ascontiguousarray(images, dtype=np.uint8), labels.astype(np.int64), names


# ---- the reader ---------------------------------------------------------------------------------------------------
def read(cfg, split: str):
    """[(name, images, labels 0..K-1, class names)] of `split`: from the archive when its meta file is there,
    else from the benchmark's pickle of the split."""
    check_config(cfg)
    benchmark = _benchmark(cfg)
    directory, pickles = _folder(cfg, "path"), _folder(cfg, "pickle_path")
    pickled = pickles and pickles / f"{benchmark.pickle_prefix}_{split}.pickle"
    if directory is not None and (directory / "meta").exists():
        images, labels, names = _from_archive(cfg, directory, benchmark, split)
        source = f"the CIFAR-100 archive {directory}"
    elif pickled is not None and pickled.exists():
        images, labels, names = _from_pickles(cfg, pickled, benchmark, split)
        source = str(pickled)
    else:
        looked = [str(p) for p in (directory and directory / "meta", pickled) if p is not None]
        raise UserError(f"missing data file {' (nor '.join(looked)}{')' if len(looked) > 1 else ''} (run `make "
                        f"{cfg.get('make_target')}` for the CIFAR-100 archive)")
    log.info(f"dataset {cfg.name}/{split}: {len(names)} classes, {len(labels)} images from {source}")
    return [(str(cfg.name), images, labels, names)]
