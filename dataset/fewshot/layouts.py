"""Readers of the original on-disk layouts (spec §3): each gives images [N, H, W, 3] uint8 and their labels.

Large arrays are memory-mapped rather than read: the npy files, and the images of an npz archive whose members
are stored uncompressed (as numpy's `savez` writes them). Every unreadable file is a one-line `UserError` that
names the path and, where one provides it, the make target.
"""
import os
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dataset.safe_pickle import load_pickle, make_hint, require_file
from engine.errors import UserError

SPLITS = ("train", "val", "test")
# The RFS/MetaOptNet miniImageNet file of each split (spec §3).
MINI_IMAGENET_FILES = {
    "train": "miniImageNet_category_split_train_phase_train.pickle",
    "val": "miniImageNet_category_split_val.pickle",
    "test": "miniImageNet_category_split_test.pickle",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")




def checked(images: np.ndarray, labels, source: Path) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and types: images [N, H, W, 3] uint8, labels [N] or [N, L] integers ([N, 1] squeezed)."""
    if images.ndim != 4 or images.shape[3] != 3:
        raise UserError(f"{source}: images have shape {tuple(images.shape)}, expected (N, height, width, 3)")
    if images.dtype != np.uint8:
        # The RFS pickles were cast with astype(uint8) by the original; accept integers that fit.
        if not np.issubdtype(images.dtype, np.integer) or images.min() < 0 or images.max() > 255:
            raise UserError(f"{source}: images are {images.dtype}, expected uint8 values 0-255")
        images = images.astype(np.uint8)
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim not in (1, 2) or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{source}: {len(images)} images but labels of shape {labels.shape} and type {labels.dtype}; "
                        f"expected one integer label (or one per level) per image")
    return images, labels.astype(np.int64)


def read_pickled_arrays(path: Path, make_target: str | None) -> tuple[np.ndarray, np.ndarray]:
    """A pickled dict with `data` (images) and `labels`: the RFS miniImageNet and meta-dataset pickles."""
    content = load_pickle(path, make_target)
    if not isinstance(content, dict) or not {"data", "labels"} <= set(content):
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise UserError(f"{path}: expected a dict with 'data' and 'labels', found {keys}")
    return checked(np.asarray(content["data"]), content["labels"], path)


def read_npy(path: Path, make_target: str | None, memory_map: bool = True) -> np.ndarray:
    require_file(path, make_target)
    try:
        return np.load(path, mmap_mode="r" if memory_map else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"{path} is truncated or not a .npy file ({exc}){make_hint(make_target)}") from None


def read_npz_array(path: Path, key: str, make_target: str | None) -> np.ndarray:
    """Member `key` of an .npz archive, memory-mapped when stored uncompressed (no multi-GB copy in RAM)."""
    require_file(path, make_target)
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(f"{key}.npy")
        if info.compress_type == zipfile.ZIP_STORED:
            mapped = _memory_map_member(path, info)
            if mapped is not None:
                return mapped
        with np.load(path, allow_pickle=False) as archive:  # compressed: it has to be read
            return archive[key]
    except KeyError:
        raise UserError(f"{path} has no array '{key}'{make_hint(make_target)}") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise UserError(f"{path} is truncated or not an .npz file ({exc}){make_hint(make_target)}") from None


def _memory_map_member(path: Path, info: zipfile.ZipInfo) -> np.ndarray | None:
    header_readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(path, "rb") as handle:
        # The member's bytes follow its local header: 30 fixed bytes, then the file name and an extra field.
        handle.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        handle.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        if version not in header_readers:
            return None
        shape, fortran_order, dtype = header_readers[version](handle)
        offset = handle.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


def _decode(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path} is not a readable image ({exc}): remove it or replace it") from None


def read_image_folders(split_dir: Path, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`split_dir/<class>/<image>`: every image resized to image_size x image_size; classes numbered in name order."""
    class_dirs = sorted(entry for entry in split_dir.iterdir() if entry.is_dir())
    if not class_dirs:
        raise UserError(f"{split_dir} has no class folders: expected {split_dir}/<class>/<image files>")
    files, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        found = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise UserError(f"{class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)} files): add some or remove it")
        files += found
        labels += [label] * len(found)
    images = np.empty((len(files), image_size, image_size, 3), np.uint8)
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # Pillow decodes without holding the GIL
        decoded = pool.map(partial(_decode, size=image_size), files)
        for i, image in enumerate(tqdm(decoded, total=len(files), desc=f"decoding {split_dir}", disable=None)):
            images[i] = image
    return images, np.array(labels, dtype=np.int64)
