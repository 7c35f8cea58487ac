"""Build a mini-60 / tiered-780 style few-shot dataset from an ImageNet training directory.

    python dataset/ximagenet/generate.py --imagenet-dir ILSVRC2012/train --num-classes 1000 --images-per-class 60 \
        [--splits mini_union_tiered] [--seed 0] [--image-size 84] [--output DIR] [--workers N]

What it takes and writes: docs/data_formats.md. The classes are the synsets of all_synsets.txt with at least M
images, in one order shuffled with the seed; a split's forced synsets (--splits) fill it first. JPEGs are decoded
at the smallest DCT scale still larger than the target (fast) and resized with area averaging (the original used
OpenCV's INTER_AREA). Each file appears only once complete.
"""
import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from any directory

from engine.errors import UserError  # noqa: E402
from engine.workspace import data_root, written_atomically  # noqa: E402

SPLIT_LISTS = Path(__file__).resolve().parents[1] / "resources" / "imagenet_splits"
SPLITS = ("train", "val", "test")
FILE_STEMS = {"train": "train", "val": "valid", "test": "test"}  # the original's name for the val split
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def read_synsets(path: Path) -> list[str]:
    """The synset id (first word) of each line."""
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def split_sizes(n_classes: int) -> dict[str, int]:
    train, val = int(0.64 * n_classes), int(0.16 * n_classes)
    sizes = {"train": train, "val": val, "test": n_classes - train - val}
    if min(sizes.values()) < 1:
        raise UserError(f"--num-classes {n_classes} leaves a split empty ({sizes}): use at least 7")
    return sizes


def choose_classes(available: list[str], n_classes: int, forced: dict[str, set[str]],
                   rng: np.random.Generator) -> dict[str, list[str]]:
    """Synsets per split: forced ones first, then the others, all in one seeded shuffled order."""
    sizes = split_sizes(n_classes)
    order = [available[i] for i in rng.permutation(len(available))]
    chosen = {split: [s for s in order if s in forced[split]][:sizes[split]] for split in SPLITS}
    free = [s for s in order if not any(s in synsets for synsets in forced.values())]
    for split in SPLITS:
        missing = sizes[split] - len(chosen[split])
        chosen[split] += free[:missing]
        free = free[missing:]
        if len(chosen[split]) < sizes[split]:
            raise UserError(f"{split} needs {sizes[split]} classes but only {len(chosen[split])} usable synsets are "
                            f"left for it: lower --num-classes or --images-per-class, or use --splits none")
    return chosen


def load_image(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))
            return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BOX))
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path} is not a readable image ({exc}): remove it and run again") from None


def generate(imagenet_dir: Path, n_classes: int, per_class: int, splits: str, seed: int, image_size: int,
             output: Path, workers: int) -> dict[str, list[str]]:
    if not imagenet_dir.is_dir():
        raise UserError(f"--imagenet-dir {imagenet_dir} is not a directory (expected <synset>/*.JPEG folders)")
    images_of = {}
    for synset in read_synsets(SPLIT_LISTS / "all_synsets.txt"):
        folder = imagenet_dir / synset
        if folder.is_dir():
            files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if len(files) >= per_class:
                images_of[synset] = files
    if len(images_of) < n_classes:
        raise UserError(f"only {len(images_of)} ImageNet synsets in {imagenet_dir} have {per_class} images or more: "
                        f"lower --num-classes or --images-per-class")
    forced = {split: set() if splits == "none" else set(read_synsets(SPLIT_LISTS / splits / f"{split}.txt"))
              for split in SPLITS}
    rng = np.random.default_rng(seed)
    chosen = choose_classes(sorted(images_of), n_classes, forced, rng)
    output.mkdir(parents=True, exist_ok=True)
    first_label = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow decodes and resizes without holding the GIL
        for split in SPLITS:
            synsets = chosen[split]
            with written_atomically(output / f"{FILE_STEMS[split]}_images.npy") as tmp:
                images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                                   shape=(len(synsets) * per_class, image_size, image_size, 3))
                for c, synset in enumerate(tqdm(synsets, desc=f"{split} classes", unit="class")):
                    files = [images_of[synset][i]
                             for i in rng.choice(len(images_of[synset]), per_class, replace=False)]
                    for i, image in enumerate(pool.map(partial(load_image, size=image_size), files)):
                        images[c * per_class + i] = image
                images.flush()
                del images
            labels = np.repeat(np.arange(first_label, first_label + len(synsets), dtype=np.int64), per_class)
            # a handle: np.save would add .npy to the temporary name
            with written_atomically(output / f"{FILE_STEMS[split]}_labels.npy") as tmp, open(tmp, "wb") as handle:
                np.save(handle, labels)
            first_label += len(synsets)
    (output / "synsets.json").write_text(json.dumps(chosen, indent=1))
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imagenet-dir", type=Path, required=True, help="ILSVRC-2012 train: <synset>/*.JPEG")
    parser.add_argument("--num-classes", type=int, required=True, help="N classes over the three splits")
    parser.add_argument("--images-per-class", type=int, required=True, help="M images per class (mini-60: 60)")
    parser.add_argument("--splits", default="mini_union_tiered",
                        choices=["mini", "tiered", "mini_union_tiered", "none"],
                        help="which published split lists force synsets into their split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--output", type=Path, default=None, help="default: $WORKSPACE/metaL_data/x{M}ImageNet")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="image decoding threads")
    args = parser.parse_args(argv)
    output = args.output or data_root() / f"x{args.images_per_class}ImageNet"
    try:
        if args.images_per_class < 1 or args.image_size < 1:
            raise UserError("--images-per-class and --image-size must be at least 1")
        chosen = generate(args.imagenet_dir.expanduser(), args.num_classes, args.images_per_class, args.splits,
                          args.seed, args.image_size, output.expanduser(), max(1, args.workers))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    counts = "/".join(str(len(chosen[split])) for split in SPLITS)
    print(f"wrote {output}: {counts} classes (train/val/test) x {args.images_per_class} images of "
          f"{args.image_size}x{args.image_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
