"""CIFAR-100 in its official python-pickle layout, with the 4-level hierarchy MAXL uses, and a generated
stand-in in the same layout (`synthetic_hier`).

`download` fetches the archive with torchvision (md5-checked), e.g. into `$WORKSPACE/metaL_data/cifar-100-python`
(`python -m tools.download cifar100`; `cifar10` for CIFAR-10, the flat dataset of the psi sweep).
"""
import os
import pickle
import shutil
from pathlib import Path

import numpy as np

from dataset.safe_pickle import load_pickle
from engine.errors import UserError

# The reference's hard-coded maps: CIFAR's 20 coarse classes -> 10 groups -> 3 (animals, plants, objects/scenes).
COARSE20_TO_10 = {0: 1, 1: 2, 2: 5, 3: 6, 4: 5, 5: 6, 6: 6, 7: 3, 8: 0, 9: 7, 10: 8, 11: 0, 12: 1, 13: 3, 14: 4,
                  15: 0, 16: 2, 17: 5, 18: 9, 19: 9}
GROUP10_TO_3 = {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 2, 7: 2, 8: 2, 9: 2}


def hierarchy_labels(coarse: np.ndarray, fine: np.ndarray) -> np.ndarray:
    """[N, 4] int64 labels, coarse to fine: [c3, c10, c20, c100]."""
    c10 = np.vectorize(COARSE20_TO_10.get)(coarse)
    c3 = np.vectorize(GROUP10_TO_3.get)(c10)
    return np.stack([c3, c10, coarse, fine], axis=1).astype(np.int64)


def read_split(directory: Path, split: str, make_target: str | None):
    """Images [N, 32, 32, 3] uint8 and their [N, 4] hierarchy labels from `<directory>/<split>`."""
    batch = load_pickle(Path(directory) / split, make_target)
    side = int(round((batch["data"].shape[1] // 3) ** 0.5))
    images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
    labels = hierarchy_labels(np.asarray(batch["coarse_labels"]), np.asarray(batch["fine_labels"]))
    return np.ascontiguousarray(images), labels


def write_synthetic(directory: Path, train_per_class: int, test_per_class: int, image_size: int, seed: int, *,
                    fine_names: list[str] | None = None, coarse_names: list[str] | None = None,
                    coarse_of: list[int] | None = None):
    """Write a small CIFAR-100-like dataset (100 fine classes, fine f under coarse f // 5) in the official layout;
    `fine_names`, `coarse_names` and `coarse_of` (each fine class's coarse id) replace the generated hierarchy.
    A fine class is a random 4x4 colour pattern, upsampled, plus noise; the fine classes of a coarse class share a
    base colour, so both levels are learnable. Written into a temporary directory, then renamed, so that processes
    generating it at once (torchrun ranks) all end with the same complete files."""
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    base = rng.uniform(40, 215, size=(20, 1, 1, 3))
    coarse_of = np.arange(100) // 5 if coarse_of is None else np.asarray(coarse_of)
    patterns = np.clip(base[coarse_of] + rng.normal(0, 40, size=(100, 4, 4, 3)), 0, 255)
    scale = -(-image_size // 4)
    patterns = patterns.repeat(scale, axis=1).repeat(scale, axis=2)[:, :image_size, :image_size]
    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = np.repeat(np.arange(100), per_class)
        images = np.clip(patterns[fine] + rng.normal(0, 25, size=patterns[fine].shape), 0, 255).astype(np.uint8)
        batch = {"data": images.transpose(0, 3, 1, 2).reshape(len(fine), -1), "fine_labels": fine.tolist(),
                 "coarse_labels": coarse_of[fine].tolist(), "batch_label": f"synthetic {split}",
                 "filenames": [f"synthetic_{i}.png" for i in range(len(fine))]}
        with open(tmp / split, "wb") as handle:
            pickle.dump(batch, handle)
    with open(tmp / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": fine_names or [f"fine{i}" for i in range(100)],
                     "coarse_label_names": coarse_names or [f"coarse{i}" for i in range(20)]}, handle)
    try:
        tmp.rename(directory)
    except OSError:  # another process finished first: its copy is identical
        shutil.rmtree(tmp)


def download(data_dir: Path, cifar10: bool) -> Path:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if cifar10 else torchvision.datasets.CIFAR100
    try:
        dataset = cls(root=str(data_dir), train=True, download=True)
    except (OSError, RuntimeError) as exc:  # no network (URLError is an OSError), a full disk, a failed md5 check
        reason = str(getattr(exc, "reason", None) or exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{cls.__name__} could not be downloaded from {cls.url} into {data_dir} ({reason}): check "
                        f"the network and the disk and run the same command again, or put the archive "
                        f"{cls.filename} there yourself") from None
    return Path(dataset.root) / dataset.base_folder
