"""MeLa loaders: every original layout, generated small, read through `dataset=<name>` configs."""
import numpy as np
import pytest
import torch
from mela_data_layouts import (SIZE, SPLITS, split_arrays, write_h_aircraft, write_metadataset, write_mini_imagenet,
                               write_tiered, write_ximagenet)
from PIL import Image

from dataset.fewshot import dataset_config, load_split, load_supervised_set, make_tasks
from dataset.fewshot.layouts import MINI_IMAGENET_FILES
from engine.errors import UserError

CLASSES = {"train": 6, "val": 5, "test": 5}
PER_CLASS = 8


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKSPACE", str(tmp_path))
    return tmp_path / "metaL_data"


# dataset name -> (writer of its layout, names of its sub-datasets)
LAYOUTS = {
    "miniImageNet": (lambda d: write_mini_imagenet(d / "miniImageNet", CLASSES, PER_CLASS), ["miniImageNet"]),
    "tieredImageNet": (lambda d: write_tiered(d / "tieredImageNet", CLASSES, PER_CLASS), ["tieredImageNet"]),
    "mini60": (lambda d: write_ximagenet(d / "mini-60", CLASSES, PER_CLASS), ["mini60"]),  # the readme's name
    "tiered780": (lambda d: write_ximagenet(d / "x780ImageNet", CLASSES, PER_CLASS), ["tiered780"]),  # the code's
    "mixed": (lambda d: write_metadataset(d, CLASSES, PER_CLASS), ["aircraft", "cub", "vgg"]),
    "h_aircraft": (lambda d: write_h_aircraft(d / "aircraft", CLASSES, PER_CLASS),
                   ["aircraft_variant", "aircraft_maker", "aircraft_family"]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_reads_its_files_with_labels_from_zero(name, data_dir):
    write, sub_names = LAYOUTS[name]
    write(data_dir)
    cfg = dataset_config(name)
    for split in SPLITS:
        subsets = load_split(cfg, split)
        assert [s.name for s in subsets] == sub_names
        images, labels = split_arrays(split, CLASSES, PER_CLASS)
        for sub in subsets:
            flat = sub.flat
            assert flat.images.dtype == np.uint8 and flat.images.shape == (len(labels), SIZE, SIZE, 3)
            assert flat.labels.dtype == np.int64 and flat.labels.min() == 0
            if sub.name in ("aircraft_maker", "aircraft_family"):
                assert flat.n_cls < CLASSES[split]  # coarser levels: fewer classes
            else:
                assert flat.n_cls == CLASSES[split]
                np.testing.assert_array_equal(flat.labels, labels - labels.min())
            image, label, index = flat[len(flat) - 1]
            assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
            assert (int(label), index) == (flat.labels[-1], len(flat) - 1)
        if name == "miniImageNet":  # the pickled images come back unchanged
            np.testing.assert_array_equal(subsets[0].flat.images, images)
        tasks = make_tasks(subsets, n_ways=2, n_shots=2, n_queries=3, seed=0)  # h_aircraft has 2 makers
        task = tasks[len(tasks) - 1]
        assert task.support_x.shape == (4, 3, SIZE, SIZE) and task.query_x.shape == (6, 3, SIZE, SIZE)
        assert task.support_y.tolist() == [0, 0, 1, 1] and task.query_y.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("name", ["tieredImageNet", "mini60"])
def test_large_arrays_are_memory_mapped(name, data_dir):
    LAYOUTS[name][0](data_dir)
    flat = load_split(dataset_config(name), "train")[0].flat
    assert isinstance(flat.images, np.memmap)


def test_missing_file_names_path_and_make_target(data_dir):
    with pytest.raises(UserError) as err:
        load_split(dataset_config("miniImageNet"), "val")
    message = str(err.value)
    assert str(data_dir / "miniImageNet" / MINI_IMAGENET_FILES["val"]) in message
    assert "make download_miniimagenet unpack_datasets" in message and "\n" not in message
    with pytest.raises(UserError, match=r"x60ImageNet/valid_images\.npy \(nor in .*mini-60\).*make download_mini60"):
        load_split(dataset_config("mini60"), "val")
    with pytest.raises(UserError, match=r"cu_birds/cub_train\.pkl.*make download_aircraft download_cu_birds"):
        write_metadataset(data_dir, CLASSES, PER_CLASS)
        (data_dir / "cu_birds" / "cub_train.pkl").unlink()
        load_split(dataset_config("mixed"), "train")


@pytest.mark.parametrize("relative", ["miniImageNet/miniImageNet_category_split_test.pickle",
                                      "tieredImageNet/test_images.npz", "x60ImageNet/test_images.npy"])
def test_html_page_saved_as_data_is_named(relative, data_dir):
    for name in ("miniImageNet", "tieredImageNet", "mini60"):
        LAYOUTS[name][0](data_dir)
    (data_dir / "mini-60").rename(data_dir / "x60ImageNet")
    (data_dir / relative).write_bytes(b"<!DOCTYPE html><html><body>Sign in to figshare</body></html>")
    name = {"miniImageNet": "miniImageNet", "tieredImageNet": "tieredImageNet", "x60ImageNet": "mini60"}
    with pytest.raises(UserError, match="is an HTML page"):
        load_split(dataset_config(name[relative.split("/")[0]]), "test")


def test_bad_config_values_are_user_errors(data_dir):
    with pytest.raises(UserError, match="is a dataset with a label hierarchy .*: the MeLa scripts take dataset="):
        load_split(dataset_config("cifar100"), "train")
    with pytest.raises(UserError, match="split 'valid' is not one of train, val, test"):
        load_split(dataset_config("synthetic_fs"), "valid")
    with pytest.raises(UserError, match=r"dataset=custom needs its directory: add dataset.path=DIR"):
        load_split(dataset_config("custom"), "train")
    with pytest.raises(UserError, match=r"dataset.domains=\['birds'\]"):
        load_split(dataset_config("mixed", domains=["birds"]), "train")
    with pytest.raises(UserError, match=r"dataset.levels"):
        load_split(dataset_config("h_aircraft", levels=["variant", "model"]), "train")


def test_mixed_reads_an_aircraft_file_left_with_three_label_columns(data_dir):
    write_metadataset(data_dir, CLASSES, PER_CLASS, aircraft_three_columns=True)
    aircraft = load_split(dataset_config("mixed", domains=["aircraft"]), "val")[0].flat
    assert aircraft.labels.ndim == 1 and aircraft.n_cls == CLASSES["val"]


def test_supervised_mixed_offsets_each_domain(data_dir):
    write_metadataset(data_dir, CLASSES, PER_CLASS)
    flat = load_supervised_set(dataset_config("mixed"), "train", augment=True, rotate=True)
    n = CLASSES["train"] * PER_CLASS
    assert flat.n_cls == 3 * CLASSES["train"] and len(flat) == 4 * 3 * n
    np.testing.assert_array_equal(flat.labels[n:2 * n], np.repeat(np.arange(6, 12), PER_CLASS))
    assert flat.transform.augment and flat.rotate


def test_supervised_h_aircraft_has_one_label_column_per_level(data_dir):
    write_h_aircraft(data_dir / "aircraft", CLASSES, PER_CLASS)
    flat = load_supervised_set(dataset_config("h_aircraft"), "train")
    variant = split_arrays("train", CLASSES, PER_CLASS)[1]
    expected = np.stack([variant, variant // 3, variant // 2], axis=1)  # levels: variant, maker, family
    np.testing.assert_array_equal(flat.labels, expected - expected.min(axis=0))
    assert flat.n_cls == (6, 2, 3)
    image, labels, _ = flat[0]
    assert labels.tolist() == expected[0].tolist()
    batch = torch.utils.data.default_collate(flat.__getitems__([0, 47]))
    assert batch[1].shape == (2, 3)


def test_supervised_h_aircraft_falls_back_to_the_original_three_column_file(data_dir):
    write_h_aircraft(data_dir / "aircraft", CLASSES, PER_CLASS, hierarchy=False)
    cfg = dataset_config("h_aircraft")
    with pytest.raises(UserError, match=r"aircraft_hierarchy_train\.pkl.*tfrecords_to_pickle\.py --dataset aircraft"):
        load_supervised_set(cfg, "train")
    write_metadataset(data_dir, CLASSES, PER_CLASS, aircraft_three_columns=True)
    assert load_supervised_set(cfg, "train").labels.shape == (CLASSES["train"] * PER_CLASS, 3)


def test_custom_reads_miniimagenet_pickles_or_image_folders(data_dir, tmp_path):
    write_mini_imagenet(tmp_path / "mine", CLASSES, PER_CLASS)
    flat = load_split(dataset_config("custom", path=str(tmp_path / "mine"), image_size=SIZE), "test")[0].flat
    assert flat.n_cls == CLASSES["test"] and flat.images.shape[1:] == (SIZE, SIZE, 3)

    rng = np.random.default_rng(0)
    for split, classes in (("train", ["cat", "dog", "emu"]), ("val", ["fox", "gnu"]), ("test", ["hen", "owl"])):
        for c in classes:
            (tmp_path / "folders" / split / c).mkdir(parents=True)
            for i in range(3):
                size = (10 + i, 7 + i)  # any size: resized on load
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
                    tmp_path / "folders" / split / c / f"{i}.png")
    cfg = dataset_config("custom", path=str(tmp_path / "folders"), image_size=16)
    flat = load_split(cfg, "train")[0].flat
    assert flat.images.shape == (9, 16, 16, 3) and flat.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    (tmp_path / "folders" / "val" / "gnu" / "0.png").write_bytes(b"not a picture")
    with pytest.raises(UserError, match=r"gnu/0\.png is not a readable image"):
        load_split(cfg, "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"dataset.test_file=test: nothing under .*empty \(test/, test.npz"):
        load_split(dataset_config("custom", path=str(tmp_path / "empty")), "test")


def test_synthetic_is_generated_once_and_again_for_other_settings(data_dir):
    cfg = dataset_config("synthetic_fs")
    subsets = {split: load_split(cfg, split)[0].flat for split in SPLITS}
    assert {split: flat.n_cls for split, flat in subsets.items()} == dict(cfg.generate.classes)
    assert all(flat.n_cls >= 5 for flat in subsets.values())  # 5-way tasks in every split
    assert subsets["train"].images.shape[1:] == (32, 32, 3)
    train_file = data_dir / "synthetic_fs" / MINI_IMAGENET_FILES["train"]
    written = train_file.stat().st_mtime_ns
    load_split(cfg, "train")
    assert train_file.stat().st_mtime_ns == written
    bigger = load_split(dataset_config("synthetic_fs", **{"generate.image_size": 40}), "train")[0].flat
    assert bigger.images.shape[1:] == (40, 40, 3)
    assert not list((data_dir / "synthetic_fs").glob(".*tmp*"))  # written atomically, nothing left behind


def test_digits_splits_classes_and_upscales(data_dir):
    cfg = dataset_config("digits")
    sizes = {}
    for split in SPLITS:
        flat = load_split(cfg, split)[0].flat
        assert flat.images.shape[1:] == (32, 32, 3) and flat.n_cls == len(cfg.class_split[split])
        sizes[split] = len(flat)
    assert sum(sizes.values()) == 1797
    with pytest.raises(UserError, match="none shared"):
        load_split(dataset_config("digits", **{"class_split.val": [3, 4, 5]}), "val")
