"""dataset/ximagenet/generate.py on a tiny generated ImageNet-like folder of JPEGs."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset.fewshot import dataset_config, load_split
from dataset.ximagenet import generate

REPO = Path(__file__).resolve().parents[1]
LISTS = REPO / "dataset" / "resources" / "imagenet_splits"


def synsets(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """4 mini-train, 2 mini-val, 2 mini-test and 6 other synsets with 4 JPEGs each; one more with only 2."""
    root = tmp_path_factory.mktemp("imagenet") / "train"
    mini = {split: synsets(LISTS / "mini" / f"{split}.txt") for split in ("train", "val", "test")}
    listed = set().union(*mini.values())
    others = [s for s in synsets(LISTS / "all_synsets.txt") if s not in listed]
    chosen = mini["train"][:4] + mini["val"][:2] + mini["test"][:2] + others[:6]
    rng = np.random.default_rng(0)
    for synset in chosen + [others[6]]:
        (root / synset).mkdir(parents=True)
        for i in range(2 if synset == others[6] else 4):
            pixels = rng.integers(0, 256, (30 + 5 * i, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / synset / f"{synset}_{i}.JPEG", quality=90)
    return root, mini, others[6]


def run_generator(imagenet_dir: Path, output: Path, seed: int, cwd: Path):
    return subprocess.run([sys.executable, str(REPO / "dataset" / "ximagenet" / "generate.py"),
                           "--imagenet-dir", str(imagenet_dir), "--num-classes", "10", "--images-per-class", "3",
                           "--splits", "mini", "--seed", str(seed), "--image-size", "20", "--output", str(output),
                           "--workers", "2"], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_generates_the_npy_layout_with_forced_splits(imagenet, tmp_path, monkeypatch):
    root, mini, too_small = imagenet
    run = run_generator(root, tmp_path / "mini-60", seed=0, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "6/1/3 classes (train/val/test) x 3 images of 20x20" in run.stdout
    out = tmp_path / "mini-60"
    chosen = json.loads((out / "synsets.json").read_text())
    assert [len(chosen[s]) for s in ("train", "val", "test")] == [6, 1, 3]
    assert set(mini["train"][:4]) <= set(chosen["train"]) and set(mini["test"][:2]) <= set(chosen["test"])
    assert set(chosen["val"]) <= set(mini["val"][:2])  # the other mini-val synset is kept out of train and test
    assert not set(mini["val"]) & set(chosen["train"] + chosen["test"]) and too_small not in sum(chosen.values(), [])
    first_label = 0
    for split, stem in (("train", "train"), ("val", "valid"), ("test", "test")):
        images, labels = np.load(out / f"{stem}_images.npy"), np.load(out / f"{stem}_labels.npy")
        n = len(chosen[split])
        assert images.shape == (3 * n, 20, 20, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(labels, np.repeat(np.arange(first_label, first_label + n), 3))
        first_label += n
    assert not list(out.glob(".*"))  # temporary files renamed

    assert generate.main(["--imagenet-dir", str(root), "--num-classes", "10", "--images-per-class", "3",
                          "--splits", "mini", "--seed", "0", "--image-size", "20", "--output", str(tmp_path / "again"),
                          "--workers", "1"]) == 0
    for name in ("train_images.npy", "valid_labels.npy", "synsets.json"):  # seeded: the same output
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    monkeypatch.setenv("WORKSPACE", str(tmp_path))
    (tmp_path / "mini-60").rename(tmp_path / "metaL_data")  # any directory: dataset.path
    val = load_split(dataset_config("mini60", path=str(tmp_path / "metaL_data")), "val")[0].flat
    assert val.n_cls == 1 and len(val) == 3


def test_too_few_synsets_is_a_one_line_error(imagenet, tmp_path, capsys):
    root, _, _ = imagenet
    assert generate.main(["--imagenet-dir", str(root), "--num-classes", "40", "--images-per-class", "3",
                          "--output", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err == ("error: only 14 ImageNet synsets in " + str(root) + " have 3 images or more: "
                                       "lower --num-classes or --images-per-class\n")
