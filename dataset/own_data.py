"""Your own data, for both kinds of dataset (`dataset=hier_file` for MAXL, `dataset=custom` for MeLa): finding a
split's file, reading arrays and image files, checking labels, subsets, and the one image size rule (the user's
description: docs/own_data.md). Label ids with gaps are renumbered 0..K-1 in id order, logged. Every image ends up
`image_size` x `image_size` (RGB, bilinear, Pillow); arrays already that size are used as they are (a memory map
stays one). Subsets (`classes`, `per_class`) are drawn from `dataset.seed` (not the run's seed), one stream per
purpose and split, so the same keys give the same images in every run and script.
"""
import csv
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dataset.safe_pickle import load_pickle
from engine.errors import UserError

log = logging.getLogger("metalabel")

ARRAY_SUFFIXES = (".npz", ".pkl", ".pickle")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
FILE_COLUMN = "file"  # the image column of a levels CSV
LEVELS_CSV = "labels.csv"  # the CSV a hierarchical image folder holds
SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
# Random streams of dataset.seed, one per purpose (then per split): changing one key leaves the other draws alone.
CLASSES_STREAM, PER_CLASS_STREAM, CARVE_STREAM = range(3)
SHOWN_NAMES = 12  # class names listed in a log line before "..."


def subset_rng(seed: int, stream: int, split: str | None = None) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream] + ([SPLIT_INDEX[split]] if split else []))


def shown(names) -> str:
    names = [str(n) for n in names]
    return ", ".join(names[:SHOWN_NAMES]) + (f", ... ({len(names)} in all)" if len(names) > SHOWN_NAMES else "")


# ---- finding a split ---------------------------------------------------------------------------------------
def find_split(directory: Path, value, key: str, suffixes: tuple[str, ...], fallback: Path | None = None,
               optional: bool = False) -> Path | None:
    """The file or folder `directory/value` names: as given, or with one of `suffixes` when it has none.

    `fallback` is used when nothing matches; `optional`: None when nothing matches (instead of an error)."""
    if value is None or str(value).strip() == "":
        raise UserError(f"dataset.{key}={'null' if value is None else repr(value)}: name a file or folder under "
                        f"dataset.path={directory}")
    base = directory / str(value)
    if base.suffix.lower() in suffixes:
        candidates = [base]
    else:
        candidates = [base, *(base.with_name(base.name + suffix) for suffix in suffixes)]
    found = [c for c in candidates if c.exists()]
    if len(found) > 1:
        raise UserError(f"dataset.{key}={value} matches {' and '.join(str(f) for f in found)}: give the full "
                        f"name, e.g. dataset.{key}={found[1].name}")
    if found:
        return found[0]
    if fallback is not None and fallback.is_file():
        return fallback
    if optional:
        return None
    tried = ", ".join(c.name + ("/" if c == base and len(candidates) > 1 else "") for c in candidates)
    raise UserError(f"dataset.{key}={value}: nothing under {directory} ({tried} do not exist): set dataset.path "
                    f"to the folder holding the data or dataset.{key} to its name")


# ---- arrays ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=2)
def _pickle_content(path: str, size: int, modified_ns: int):
    """A pickle read once for the labels (checks before the run) and the images (loading); keyed by its stat."""
    return load_pickle(Path(path))


def _array_content(path: Path, key: str):
    if path.suffix.lower() == ".npz":
        from dataset.fewshot.layouts import read_npz_array  # here: dataset.fewshot's sources import this module

        return read_npz_array(path, key, None)
    stat = path.stat()
    content = _pickle_content(str(path), stat.st_size, stat.st_mtime_ns)
    if not isinstance(content, dict) or key not in content:
        found = sorted(map(str, content)) if isinstance(content, dict) else type(content).__name__
        raise UserError(f"{path} has no '{key}': expected a dict with 'data' (images) and 'labels', found {found}")
    return content[key]


def read_array_labels(path: Path) -> np.ndarray:
    """The `labels` of an .npz or pickle as [N, L] int64 (an .npz's images are not read)."""
    labels = np.asarray(_array_content(path, "labels"))
    if labels.ndim not in (1, 2) or len(labels) == 0:
        raise UserError(f"{path}: 'labels' has shape {labels.shape}, expected one integer id per image (N,) or one "
                        f"per level (N, L)")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise UserError(f"{path}: 'labels' are {labels.dtype}, expected integer class ids")
    labels = labels.reshape(len(labels), -1).astype(np.int64)
    if labels.min() < 0:
        row = int(np.argwhere(labels < 0)[0, 0])
        raise UserError(f"{path}: label {int(labels[row].min())} at row {row} is negative: ids must be 0 or more "
                        f"(drop unlabelled images from the file)")
    return labels


def read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`data` as uint8 [N, H, W, 3] (grey images made RGB; an .npz's stored array memory-mapped) and `labels` as
    int64 [N, L], checked."""
    labels = read_array_labels(path)
    images = _array_content(path, "data")
    images = images if isinstance(images, np.ndarray) else np.asarray(images)
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
        raise UserError(f"{path}: 'data' has shape {images.shape}, expected images (N, height, width, 3) or grey "
                        f"(N, height, width); channels-first arrays need .transpose(0, 2, 3, 1)")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.integer) or images.min() < 0 or images.max() > 255:
            raise UserError(f"{path}: 'data' is {images.dtype}, expected uint8 values 0-255 (scale floats in [0, 1] "
                            f"by 255 and cast to uint8)")
        images = images.astype(np.uint8)
    if len(images) != len(labels):
        raise UserError(f"{path}: {len(images)} images but {len(labels)} labels: give one label row per image")
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=3)
        log.info(f"{path}: grey images, used as RGB (the grey value in all three channels)")
    return images, labels


# ---- image files -------------------------------------------------------------------------------------------
class ImageFiles:
    """Image files, decoded only when needed (`decode`), so a subset decodes only the files it keeps."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, indices) -> "ImageFiles":
        return ImageFiles([self.paths[i] for i in indices])

    def decode(self, size: int, where: str) -> np.ndarray:
        images = np.empty((len(self.paths), size, size, 3), np.uint8)
        with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # Pillow decodes without holding the GIL
            decoded = pool.map(_decode, self.paths, [size] * len(self.paths))
            for i, image in enumerate(tqdm(decoded, total=len(self.paths), desc=f"decoding {where}", disable=None)):
                images[i] = image
        return images


def _fit(image: Image.Image, size: int) -> np.ndarray:
    """The one resize of the project's own-data loaders, for files and arrays alike."""
    return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


def _decode(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return _fit(image, size)
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path} is refused as a decompression bomb ({exc}): remove it, or shrink it below "
                        f"{Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path} is not a readable image ({exc}): remove it or replace it") from None


def confined(path: Path, root: Path, where: str) -> Path:
    """`path`, which must lie inside `root` once links are resolved (own data never reads outside its folder)."""
    if not Path(path).resolve().is_relative_to(Path(root).resolve()):
        raise UserError(f"{where}: {path} leads outside {root} (to {Path(path).resolve()}): own data is read only "
                        f"from inside its folder; move or copy the files there")
    return Path(path)


def take(images, indices):
    """Items `indices` of an array or `ImageFiles` (all of them when `indices` is None)."""
    if indices is None:
        return images
    return images.take(indices) if isinstance(images, ImageFiles) else images[indices]


def fit_images(images, size, where: str) -> np.ndarray:
    """The one size rule: every image `size` x `size`; an array already that size is returned as it is."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"dataset.image_size={size}: give the side in pixels every image is resized to")
    if isinstance(images, ImageFiles):
        log.info(f"{where}: {len(images)} image files, each resized to {size}x{size} (dataset.image_size)")
        return images.decode(size, where)
    height, width = images.shape[1:3]
    if (height, width) == (size, size):
        return images
    log.info(f"{where}: {len(images)} images stored at {height}x{width}, resized to {size}x{size} "
             f"(dataset.image_size)")
    resized = np.empty((len(images), size, size, 3), np.uint8)
    for i, image in enumerate(images):
        resized[i] = _fit(Image.fromarray(np.asarray(image)), size)
    return resized


def list_class_folders(split_dir: Path) -> tuple[ImageFiles, np.ndarray, list[str]]:
    """`split_dir/<class>/<image>`: the files, their class ids (folders in name order) and the class names."""
    class_dirs = sorted(confined(entry, split_dir, f"class folder {entry.name}")
                        for entry in split_dir.iterdir() if entry.is_dir())
    if not class_dirs:
        raise UserError(f"{split_dir} has no class folders: expected {split_dir}/<class>/<image files>")
    files, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        found = sorted(confined(f, split_dir, f"image {f.name}") for f in class_dir.iterdir()
                       if f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise UserError(f"{class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)} files): add some or remove it")
        files += found
        labels += [label] * len(found)
    return ImageFiles(files), np.array(labels, dtype=np.int64), [d.name for d in class_dirs]


def read_levels_csv(path: Path) -> tuple[ImageFiles, list[str], np.ndarray]:
    """A CSV with a `file` column (image paths, relative to the CSV's folder) and one column per label level,
    coarse to fine: the files, the level column names and the values as strings [N, L]."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path} is not a readable CSV file ({exc})") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    header = [cell.strip() for cell in rows[0]] if rows else []
    if FILE_COLUMN not in header or len(header) < 2:
        raise UserError(f"{path}: the first line must name the columns: '{FILE_COLUMN}', then one column per label "
                        f"level, coarse to fine (e.g. file,superclass,class); found {header}")
    if len(rows) < 2:
        raise UserError(f"{path} lists no images: add one line per image ({','.join(header)})")
    file_at = header.index(FILE_COLUMN)
    level_names = [name for i, name in enumerate(header) if i != file_at]
    files, values = [], []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise UserError(f"{path} line {line} has {len(row)} fields, the header {len(header)}: "
                            f"one value per column ({','.join(header)})")
        cells = [cell.strip() for cell in row]
        if not all(cells):
            raise UserError(f"{path} line {line} has an empty field: every image needs a file and a label per level")
        files.append(confined(path.parent / cells[file_at], path.parent, f"{path} line {line}"))
        values.append([cell for i, cell in enumerate(cells) if i != file_at])
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{path}: {len(missing)} listed image file(s) do not exist, e.g. {missing[0]} (paths are "
                        f"relative to the CSV's folder)")
    return ImageFiles(files), level_names, np.array(values, dtype=str)


def ids_from_values(columns: list[np.ndarray], where: str) -> tuple[list[np.ndarray], list[str]]:
    """One level's values in several splits (strings) -> integer ids and the names of the ids.

    All values integers: they are the ids (names: the integers). Otherwise they are class names, numbered in
    sorted name order over all splits together."""
    joined = np.concatenate(columns)
    try:
        numbers = [np.array([int(v) for v in column], dtype=np.int64) for column in columns]
    except ValueError:
        names = sorted(set(joined.tolist()))
        index = {name: i for i, name in enumerate(names)}
        return [np.array([index[v] for v in column], dtype=np.int64) for column in columns], names
    negative = min(int(n.min()) for n in numbers)
    if negative < 0:
        raise UserError(f"{where}: label {negative} is negative: ids must be 0 or more (or use class names)")
    top = max(int(n.max()) for n in numbers)
    return numbers, [str(i) for i in range(top + 1)]


# ---- labels and subsets ------------------------------------------------------------------------------------
def renumber(columns: list[np.ndarray], names: list[str] | None, where: str,
             report: bool = True) -> tuple[list[np.ndarray], list[str]]:
    """Ids of one level (in one or several splits, numbered together) renumbered 0..K-1 in id order when they have
    gaps or do not start at 0; the names follow their ids. Logged (`report`) when anything changes."""
    used = np.unique(np.concatenate(columns))
    names = [str(n) for n in (names if names is not None else range(int(used[-1]) + 1))]
    if used[0] == 0 and used[-1] == len(used) - 1:
        return columns, names[:len(used)]
    if report:
        low, high = int(used[0]), int(used[-1])
        gaps = f" with {high - low + 1 - len(used)} unused in between" if high - low + 1 > len(used) else ""
        log.info(f"{where}: label ids run {low}..{high}{gaps}: renumbered 0..{len(used) - 1} in id order")
    return [np.searchsorted(used, column) for column in columns], [names[i] for i in used]


def choose_classes(ids: np.ndarray, spec, names: list[str], rng: np.random.Generator, key: str,
                   where: str) -> np.ndarray:
    """The class ids to keep among `ids` (sorted, distinct): `spec` is a count (drawn with `rng`) or a list of ids
    or names (matched as text against `names[id]`)."""
    if isinstance(spec, bool) or not isinstance(spec, (int, list, tuple)):
        raise UserError(f"{key}={spec}: give a number of classes or a list of class ids or names")
    if isinstance(spec, int):
        if spec < 1:
            raise UserError(f"{key}={spec} must be at least 1 (null keeps every class)")
        if spec >= len(ids):
            log.info(f"{where}: {key}={spec}, the data has {len(ids)} classes: all kept")
            return ids
        kept = np.sort(rng.choice(ids, spec, replace=False))
        log.info(f"{where}: kept {spec} of {len(ids)} classes ({key}, drawn with dataset.seed): "
                 f"{shown(names[i] for i in kept)}")
        return kept
    by_name = {names[i]: i for i in ids}
    wanted = [str(v) for v in spec]
    unknown = [w for w in wanted if w not in by_name]
    if unknown or not wanted:
        raise UserError(f"{key}={list(spec)}: {shown(unknown) or 'no class'} not among the classes of {where} "
                        f"({shown(by_name)})")
    kept = np.unique([by_name[w] for w in wanted])
    log.info(f"{where}: kept {len(kept)} of {len(ids)} classes ({key}): {shown(names[i] for i in kept)}")
    return kept


def check_per_class_and_seed(cfg) -> None:
    """`dataset.per_class` (null or a count) and `dataset.seed` (an integer), where a dataset config has them."""
    per_class, seed = cfg.get("per_class"), cfg.get("seed", 0)
    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1):
        raise UserError(f"dataset.per_class={per_class}: give a number of images per class (at least 1) or null")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"dataset.seed={seed}: give an integer")


def cap_per_class(classes: np.ndarray, per_class, rng: np.random.Generator, where: str) -> np.ndarray | None:
    """Positions (sorted) of at most `per_class` items of each class of `classes`, drawn with `rng`; None: all."""
    if per_class is None:
        return None
    kept = []
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        kept.append(members if len(members) <= per_class else rng.choice(members, per_class, replace=False))
    kept = np.sort(np.concatenate(kept))
    log.info(f"{where}: at most {per_class} images per class (dataset.per_class, drawn with dataset.seed): "
             f"{len(kept)} of {len(classes)} images")
    return kept
