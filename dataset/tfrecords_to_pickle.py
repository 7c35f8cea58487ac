"""Convert meta-dataset's TFRecords of aircraft, cu_birds or vgg_flower into the pickles the MeLa loaders read.

    python dataset/tfrecords_to_pickle.py --dataset aircraft|cu_birds|vgg_flower [--data-dir DIR] [--workers N]

Input, output and class splits: docs/data_formats.md. The records are read with the `tfrecord` package (no
TensorFlow). Every class of dataset_spec.json is used (the original dropped vgg's last), and aircraft's [variant,
family, maker] labels go to aircraft_hierarchy_{p}.pkl (the original overwrote aircraft_{p}.pkl with them).
"""
import argparse
import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tfrecord.reader import tfrecord_loader
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

from dataset.safe_pickle import save_pickle  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.workspace import data_root  # noqa: E402

IMAGE_SIZE = 84
SPLITS = ("train", "val", "test")
# dataset -> (file prefix, train classes, val classes); test takes every class after them.
DATASETS = {"aircraft": ("aircraft", 70, 15), "cu_birds": ("cub", 140, 30), "vgg_flower": ("vgg", 71, 15)}
AIRCRAFT_HIERARCHY = Path(__file__).resolve().parent / "resources" / "aircraft"


def read_spec(directory: Path) -> dict[int, int]:
    """Class id -> number of images, from meta-dataset's dataset_spec.json."""
    path = directory / "dataset_spec.json"
    if not path.is_file():
        raise UserError(f"missing {path}: run meta-dataset's conversion and move its output into {directory}")
    try:
        counts = json.loads(path.read_text())["images_per_class"]
        return {int(class_id): int(count) for class_id, count in sorted(counts.items(), key=lambda kv: int(kv[0]))}
    except (ValueError, KeyError, AttributeError) as exc:
        raise UserError(f"{path} is not a meta-dataset dataset_spec.json (no images_per_class: {exc})") from None


def decode(encoded: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            return np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST))
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"an image of the TFRecords cannot be decoded ({exc})") from None


def read_class(path: Path, expected: int, pool: ThreadPoolExecutor) -> tuple[np.ndarray, np.ndarray]:
    """Images [n, 84, 84, 3] and labels [n] of one class file."""
    if not path.is_file():
        raise UserError(f"missing {path}: dataset_spec.json lists this class, copy all {{class}}.tfrecords files")
    try:
        records = list(tfrecord_loader(str(path), None, {"image": "byte", "label": "int"}))
    except Exception as exc:  # the reader raises KeyError, TypeError, struct or protobuf errors on bad files
        raise UserError(f"{path} is not a readable TFRecord file of images and labels ({exc})") from None
    if len(records) != expected:
        raise UserError(f"{path} holds {len(records)} images but dataset_spec.json says {expected}: copy it again")
    images = np.stack(list(pool.map(decode, (record["image"] for record in records))))
    return images, np.array([int(record["label"][0]) for record in records], dtype=np.int64)


def write_split_pickles(directory: Path, name: str, split: str, images: np.ndarray, labels: np.ndarray) -> list[Path]:
    files = {f"{DATASETS[name][0]}_{split}.pkl": labels[:, None]}
    if name == "aircraft":
        family = json.loads((AIRCRAFT_HIERARCHY / "variant_to_family.json").read_text())
        maker = json.loads((AIRCRAFT_HIERARCHY / "variant_to_manufacturer.json").read_text())
        levels = {"variant": labels, "family": np.array([family[str(v)] for v in labels], dtype=np.int64),
                  "maker": np.array([maker[str(v)] for v in labels], dtype=np.int64)}
        files.update({f"aircraft_{level}_{split}.pkl": level_labels[:, None] for level, level_labels in levels.items()})
        files[f"aircraft_hierarchy_{split}.pkl"] = np.stack(list(levels.values()), axis=1)
    for file, file_labels in files.items():
        save_pickle(directory / file, {"data": images, "labels": file_labels})
    return [directory / file for file in files]


def convert(name: str, data_dir: Path, workers: int) -> list[Path]:
    directory = data_dir / name
    counts = read_spec(directory)
    _, n_train, n_val = DATASETS[name]
    class_ids = list(counts)
    if len(class_ids) <= n_train + n_val:
        raise UserError(f"{directory / 'dataset_spec.json'} lists {len(class_ids)} classes, {name} needs more than "
                        f"{n_train + n_val} (train {n_train}, val {n_val}, test the rest)")
    if name == "aircraft" and class_ids != list(range(100)):
        raise UserError(f"{directory / 'dataset_spec.json'}: aircraft must list the classes 0-99 (the variant ids of "
                        f"the family and maker tables), found {len(class_ids)}")
    bounds = {"train": class_ids[:n_train], "val": class_ids[n_train:n_train + n_val],
              "test": class_ids[n_train + n_val:]}
    written = []
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=sum(counts.values()), unit="img", desc=name) as bar:
        for split in SPLITS:
            images, labels = [], []
            for class_id in bounds[split]:
                class_images, class_labels = read_class(directory / f"{class_id}.tfrecords", counts[class_id], pool)
                images.append(class_images)
                labels.append(class_labels)
                bar.update(len(class_images))
            written += write_split_pickles(directory, name, split, np.concatenate(images), np.concatenate(labels))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $WORKSPACE/metaL_data")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="image decoding threads")
    args = parser.parse_args(argv)
    try:
        written = convert(args.dataset, (args.data_dir or data_root()).expanduser().resolve(), max(1, args.workers))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
