"""Readers of the original on-disk layouts: each gives images [N, H, W, 3] uint8 and their labels.

Large arrays are memory-mapped rather than read: the npy files, and the images of an npz archive whose members
are stored uncompressed (as numpy's `savez` writes them). Every unreadable file is a one-line `UserError` that
names the path and, where one provides it, the make target.
"""
import math
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from dataset.safe_pickle import load_pickle, make_hint, require_file
from engine.errors import UserError

SPLITS = ("train", "val", "test")
# The RFS/MetaOptNet miniImageNet file of each split.
MINI_IMAGENET_FILES = {
    "train": "miniImageNet_category_split_train_phase_train.pickle",
    "val": "miniImageNet_category_split_val.pickle",
    "test": "miniImageNet_category_split_test.pickle",
}
NUMERIC_KINDS = "biufc"  # numpy dtype kinds: bool, signed and unsigned integers, floats, complex
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


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
    """Member `key` of an .npz archive, memory-mapped when stored uncompressed (no multi-GB copy in RAM). The dtype
    and size come from the member's .npy header first: object (pickled) and other non-numeric arrays are refused,
    and so is a member holding other than the bytes its header announces."""
    require_file(path, make_target)
    hint = make_hint(make_target)
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(f"{key}.npy")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version not in NPY_HEADER_READERS:  # 3.0 only serves structured dtypes with unicode field names
                    raise UserError(f"{path}: array '{key}' has a .npy header of version {version}, which holds no "
                                    f"plain numeric array: write the images as a uint8 array{hint}")
                shape, fortran_order, dtype = NPY_HEADER_READERS[version](member)
                header_size = member.tell()
            if dtype.hasobject or dtype.kind not in NUMERIC_KINDS:
                raise UserError(f"{path}: array '{key}' has the non-numeric dtype {dtype}, refused (an object array "
                                f"is a pickle, which can run code): write the images as a uint8 array{hint}")
            announced = header_size + math.prod(shape) * dtype.itemsize
            if info.file_size != announced:
                raise UserError(f"{path}: array '{key}' holds {info.file_size} bytes where its header announces "
                                f"{announced}: the file is damaged; download it again{hint}")
            if info.compress_type == zipfile.ZIP_STORED:
                return np.memmap(path, dtype=dtype, mode="r", offset=_member_data_offset(path, info) + header_size,
                                 shape=shape, order="F" if fortran_order else "C")
            with archive.open(info) as member:  # compressed: it has to be read
                return np.lib.format.read_array(member, allow_pickle=False)
    except KeyError:
        raise UserError(f"{path} has no array '{key}'{hint}") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path} is truncated or not an .npz file ({exc}){hint}") from None


def _member_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where the bytes of an uncompressed zip member start: after its local header (30 fixed bytes, then the file
    name and an extra field, whose lengths may differ from those in the central directory)."""
    with open(path, "rb") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
    return info.header_offset + 30 + name_length + extra_length
