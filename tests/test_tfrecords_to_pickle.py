"""dataset/tfrecords_to_pickle.py on TFRecords generated here with the tfrecord package's writer."""
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tfrecord.writer import TFRecordWriter

from dataset import tfrecords_to_pickle
from dataset.fewshot import dataset_config, load_split, load_supervised_set
from dataset.safe_pickle import load_pickle

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "dataset" / "tfrecords_to_pickle.py"


def class_image(class_id: int, index: int) -> np.ndarray:
    """42x42 blocks of 7x7 pixels whose colours encode the class and the image (PNG keeps them exact)."""
    rng = np.random.default_rng([class_id, index])
    return np.kron(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), np.ones((7, 7, 1), np.uint8))


def write_metadataset_records(directory: Path, n_classes: int, per_class: int) -> None:
    directory.mkdir(parents=True)
    for class_id in range(n_classes):
        writer = TFRecordWriter(str(directory / f"{class_id}.tfrecords"))
        for index in range(per_class):
            encoded = io.BytesIO()
            Image.fromarray(class_image(class_id, index)).save(encoded, format="PNG")
            writer.write({"image": (encoded.getvalue(), "byte"), "label": (class_id, "int")})
        writer.close()
    spec = {"name": directory.name, "classes_per_split": {"TRAIN": 0, "VALID": 0, "TEST": 0},
            "images_per_class": {str(c): per_class for c in range(n_classes)}, "file_pattern": "{}.tfrecords"}
    (directory / "dataset_spec.json").write_text(json.dumps(spec))


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKSPACE", str(tmp_path / "ws"))
    data_dir = tmp_path / "ws" / "metaL_data"
    write_metadataset_records(data_dir / "aircraft", 100, 2)
    write_metadataset_records(data_dir / "vgg_flower", 102, 1)
    return data_dir


def test_aircraft_converts_from_any_directory_into_every_layout(data_dir, tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--dataset", "aircraft", "--workers", "2"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    written = {Path(line.split()[-1]).name for line in run.stdout.splitlines()}
    assert written == {f"aircraft{level}_{split}.pkl" for split in ("train", "val", "test")
                       for level in ("", "_variant", "_family", "_maker", "_hierarchy")}
    family = json.loads((REPO / "dataset" / "resources" / "aircraft" / "variant_to_family.json").read_text())
    for split, classes in (("train", range(70)), ("val", range(70, 85)), ("test", range(85, 100))):
        variant = load_pickle(data_dir / "aircraft" / f"aircraft_{split}.pkl")
        expected_labels = np.repeat(np.array(classes), 2)
        assert variant["data"].shape == (2 * len(classes), 84, 84, 3) and variant["data"].dtype == np.uint8
        np.testing.assert_array_equal(variant["labels"][:, 0], expected_labels)  # variant labels, never 3 columns
        hierarchy = load_pickle(data_dir / "aircraft" / f"aircraft_hierarchy_{split}.pkl")
        assert hierarchy["labels"].shape == (2 * len(classes), 3)
        np.testing.assert_array_equal(hierarchy["labels"][:, 1], [family[str(v)] for v in expected_labels])
        np.testing.assert_array_equal(hierarchy["data"], variant["data"])
    first = load_pickle(data_dir / "aircraft" / "aircraft_train.pkl")["data"][1]
    np.testing.assert_array_equal(first, np.repeat(np.repeat(class_image(0, 1), 2, axis=0), 2, axis=1))  # nearest

    distinct = {level: [len(np.unique(sub.flat.labels)) for split in ("train", "val", "test")
                        for sub in load_split(dataset_config("h_aircraft", levels=[level]), split)]
                for level in ("variant", "family", "maker")}
    assert distinct == {"variant": [70, 15, 15], "family": [52, 15, 14], "maker": [26, 11, 10]}  # the counts of the original archives
    assert load_supervised_set(dataset_config("h_aircraft"), "train").labels.shape == (140, 3)


def test_vgg_flower_keeps_every_class(data_dir):
    assert tfrecords_to_pickle.main(["--dataset", "vgg_flower", "--workers", "1"]) == 0
    vgg = load_split(dataset_config("mixed", domains=["vgg_flower"]), "test")[0]
    assert vgg.name == "vgg" and vgg.flat.n_cls == 16  # classes 86-101: the original dropped the last one
    assert [load_split(dataset_config("mixed", domains=["vgg_flower"]), split)[0].flat.n_cls
            for split in ("train", "val")] == [71, 15]


def test_bad_inputs_are_one_line_errors(data_dir, capsys):
    assert tfrecords_to_pickle.main(["--dataset", "cu_birds"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: missing") and "cu_birds/dataset_spec.json" in error
    (data_dir / "vgg_flower" / "5.tfrecords").write_bytes(b"\x00" * 40)
    assert tfrecords_to_pickle.main(["--dataset", "vgg_flower"]) == 1
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert error.startswith("error: ") and "vgg_flower/5.tfrecords is not a readable TFRecord file" in error
