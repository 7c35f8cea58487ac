"""Your own data without converters: `dataset=hier_file` (MAXL) and `dataset=custom` (MeLa) read arrays, image
folders and CSVs under any file names, check labels, carve a val split, take seeded subsets and resize by one rule."""
import logging
import pickle

import numpy as np
import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from PIL import Image

from engine.entry import register
from methods.scripts import SCRIPTS
from dataset import own_data
from dataset.fewshot import dataset_config, load_split
from dataset.fewshot.sources import check_config as check_fewshot_config
from dataset.hierarchical import check_config, load_hierarchical
from engine.entry import CONFIG_DIR
from engine.errors import UserError
from methods.maxl import auxiliary_task

SIZE = 12  # stored side of the generated images


def random_images(n, seed=0, size=SIZE):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def resized(images, size):
    """What the size rule promises: each image converted by Pillow's bilinear resize to size x size."""
    return np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
                     for image in images])


def save_arrays(path, images, labels):
    if path.suffix == ".npz":
        np.savez(path, data=images, labels=labels)
    else:
        with open(path, "wb") as handle:
            pickle.dump({"data": images, "labels": labels}, handle, protocol=4)


def compose(script, overrides):
    """The composed config as the dataset checks receive it (before the engine's own validation and run name)."""
    register(SCRIPTS[script])
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return hydra_compose(script, overrides=overrides)


def maxl_config(directory, *overrides):
    return compose("maxl_train", ["dataset=hier_file", f"dataset.path={directory}", *overrides])


# ---- dataset=hier_file ----------------------------------------------------------------------------------------

def two_level_labels(n_coarse, fine_per_coarse, per_fine, fine_step=1):
    """[N, 2] labels, fine class f under coarse f // fine_per_coarse; fine ids multiplied by `fine_step` (gaps)."""
    fine = np.repeat(np.arange(n_coarse * fine_per_coarse), per_fine)
    return np.stack([fine // fine_per_coarse, fine * fine_step], axis=1)


def test_hier_file_reads_arrays_under_other_names_with_levels_from_the_data(tmp_path, caplog):
    labels = {"train": two_level_labels(2, 2, 5, fine_step=3), "test": two_level_labels(2, 2, 2, fine_step=3)}
    images = {"train": random_images(20, 1), "test": random_images(8, 2)}
    save_arrays(tmp_path / "base.npz", images["train"], labels["train"])
    save_arrays(tmp_path / "holdout.pkl", images["test"], labels["test"])
    cfg = maxl_config(tmp_path, "dataset.train_file=base", "dataset.test_file=holdout.pkl", "dataset.image_size=16")
    check_config(cfg)  # before the run name: the levels come from the labels
    assert (cfg.primary_level, cfg.auxiliary_level) == (2, 4)
    assert (cfg.dataset.primary_level, cfg.dataset.auxiliary_level) == (2, 4)
    with caplog.at_level(logging.INFO, logger="metalabel"):
        data = load_hierarchical(cfg.dataset)
    assert data.level_sizes == data.level_names == [2, 4]
    for split in ("train", "test"):  # fine ids 0, 3, 6, 9 become 0..3
        expected = np.stack([labels[split][:, 0], labels[split][:, 1] // 3], axis=1)
        np.testing.assert_array_equal(getattr(data, f"{split}_labels"), expected)
        np.testing.assert_array_equal(getattr(data, f"{split}_images"), resized(images[split], 16))
    assert "label ids run 0..9 with 6 unused in between: renumbered 0..3" in caplog.text
    assert "stored at 12x12, resized to 16x16" in caplog.text


def write_listed_images(directory, rows, seed):
    """Image files under `directory`/img and (file, group, kind) rows for a levels CSV; returns the pixels."""
    (directory / "img").mkdir(parents=True, exist_ok=True)
    pixels = random_images(len(rows), seed)
    lines = ["file,group,kind"]
    for i, ((group, kind), image) in enumerate(zip(rows, pixels)):
        Image.fromarray(image).save(directory / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{group},{kind}")
    return pixels, "\n".join(lines) + "\n"


def test_hier_file_reads_images_listed_in_a_csv_with_class_names(tmp_path):
    train_rows = [("animal", "cat"), ("animal", "dog"), ("plant", "fern"), ("plant", "oak")] * 2
    test_rows = [("plant", "oak"), ("animal", "cat")]
    train_pixels, train_csv = write_listed_images(tmp_path / "train", train_rows, 1)
    (tmp_path / "train" / "labels.csv").write_text(train_csv)  # a folder with labels.csv
    test_pixels, test_csv = write_listed_images(tmp_path, test_rows, 2)
    (tmp_path / "holdout.csv").write_text(test_csv)  # or a CSV file; paths relative to it
    cfg = maxl_config(tmp_path, "dataset.test_file=holdout")
    check_config(cfg)
    assert (cfg.primary_level, cfg.auxiliary_level) == (2, 4)
    data = load_hierarchical(cfg.dataset)
    names = {"animal": 0, "plant": 1, "cat": 0, "dog": 1, "fern": 2, "oak": 3}  # sorted names, both splits
    np.testing.assert_array_equal(data.train_labels, [[names[g], names[k]] for g, k in train_rows])
    np.testing.assert_array_equal(data.test_labels, [[names[g], names[k]] for g, k in test_rows])
    np.testing.assert_array_equal(data.train_images, resized(train_pixels, 32))
    # One size rule: the same pixels stored as arrays come out identical to the files.
    (tmp_path / "a").mkdir()
    save_arrays(tmp_path / "a" / "train.npz", train_pixels, data.train_labels)
    save_arrays(tmp_path / "a" / "test.npz", test_pixels, data.test_labels)
    from_arrays = load_hierarchical(maxl_config(tmp_path / "a").dataset)
    np.testing.assert_array_equal(from_arrays.train_images, data.train_images)
    np.testing.assert_array_equal(from_arrays.test_images, data.test_images)


def subset_data(tmp_path):
    """4 coarse classes x 3 fine classes; 5 training and 2 test images per fine class."""
    labels = {"train": two_level_labels(4, 3, 5), "test": two_level_labels(4, 3, 2)}
    images = {"train": random_images(60, 1), "test": random_images(24, 2)}
    for split in labels:
        save_arrays(tmp_path / f"{split}.npz", images[split], labels[split])
    return images, labels


def test_hier_subset_keeps_whole_primary_classes_and_caps_each_finest_class(tmp_path):
    subset_data(tmp_path)
    cfg = maxl_config(tmp_path, "dataset.image_size=12", "dataset.classes=2", "dataset.per_class=3")
    check_config(cfg)
    data = load_hierarchical(cfg.dataset)
    assert data.level_names == [4, 12] and data.level_sizes == [2, 6]  # levels keep the names of the full data
    np.testing.assert_array_equal(np.bincount(data.train_labels[:, 1]), [3] * 6)  # at most 3 of each fine class
    np.testing.assert_array_equal(np.bincount(data.test_labels[:, 1]), [2] * 6)
    np.testing.assert_array_equal(data.train_labels[:, 0], data.train_labels[:, 1] // 3)  # the hierarchy holds
    task = auxiliary_task(data, cfg)  # primary_level=4, auxiliary_level=12 name the subset's levels
    assert task.psi == [3, 3]
    again = load_hierarchical(maxl_config(tmp_path, "dataset.image_size=12", "dataset.classes=2",
                                          "dataset.per_class=3").dataset)
    np.testing.assert_array_equal(again.train_images, data.train_images)  # seeded: the same subset
    picks = {tuple(load_hierarchical(maxl_config(tmp_path, "dataset.image_size=12", "dataset.classes=2",
                                                 f"dataset.seed={seed}").dataset).train_images[:, 0, 0, 0])
             for seed in range(4)}
    assert len(picks) > 1  # another seed, other classes


def test_hier_subset_by_a_list_keeps_exactly_those_classes(tmp_path):
    images, labels = subset_data(tmp_path)
    data = load_hierarchical(maxl_config(tmp_path, "dataset.image_size=12", "dataset.classes=[1,3]").dataset)
    rows = np.isin(labels["train"][:, 0], [1, 3])
    np.testing.assert_array_equal(data.train_images, images["train"][rows])
    np.testing.assert_array_equal(data.train_labels[:, 0], (labels["train"][rows, 0] - 1) // 2)
    with pytest.raises(UserError, match=r"dataset.classes=\[1, 7\]: 7 not among the classes"):
        load_hierarchical(maxl_config(tmp_path, "dataset.classes=[1,7]").dataset)


def test_subset_keys_work_on_every_hierarchical_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKSPACE", str(tmp_path))
    cfg = dataset_config("synthetic_hier", classes=3, per_class=2,
                         **{"generate.train_per_class": 3, "generate.test_per_class": 1})
    data = load_hierarchical(cfg)
    assert data.level_names == [3, 10, 20, 100] and data.level_sizes[2:] == [3, 15]  # 3 of the 20 (primary)
    assert (len(data.train_labels), len(data.test_labels)) == (30, 15)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def truncated_npz(path):
    np.savez(path, data=random_images(4), labels=np.zeros(4, int))
    path.write_bytes(path.read_bytes()[:100])


BAD_SPLITS = {
    "negative labels": (lambda p: save_arrays(p, random_images(4), np.array([[0, 0], [0, 1], [-1, 1], [1, 2]])),
                        r"label -1 at row 2 is negative"),
    "lengths differ": (lambda p: save_arrays(p, random_images(4), np.zeros((3, 2), int)),
                       r"4 images but 3 labels"),
    "channels first": (lambda p: save_arrays(p, random_images(4).transpose(0, 3, 1, 2), np.zeros((4, 2), int)),
                       r"'data' has shape \(4, 3, 12, 12\).*transpose"),
    "float images": (lambda p: save_arrays(p, random_images(4) / 255.0, np.zeros((4, 2), int)),
                     r"'data' is float64, expected uint8"),
    "truncated": (truncated_npz, r"is truncated or not an .npz file"),
    "html": (lambda p: p.write_bytes(b"<!DOCTYPE html><html>Sign in</html>"), r"is an HTML page"),
    "one level only": (lambda p: save_arrays(p, random_images(4), np.zeros(4, int)),
                       r"has 2 label levels, .* 1: both splits need the same levels"),
}


@pytest.mark.parametrize("case", BAD_SPLITS)
def test_bad_hier_files_are_one_line_errors_naming_the_file(case, tmp_path):
    write, message = BAD_SPLITS[case]
    save_arrays(tmp_path / "train.npz", random_images(6), two_level_labels(1, 2, 3))
    test_file = tmp_path / "test.npz"
    write(test_file)
    with pytest.raises(UserError, match=message) as excinfo:
        load_hierarchical(maxl_config(tmp_path, "dataset.primary_level=1", "dataset.auxiliary_level=2").dataset)
    assert str(test_file) in one_line(excinfo)


def test_hier_file_settings_are_checked_before_the_run(tmp_path):
    with pytest.raises(UserError, match=r"dataset=hier_file needs its folder: add dataset.path=DIR"):
        check_config(compose("maxl_train", ["dataset=hier_file"]))
    save_arrays(tmp_path / "train.npz", random_images(6), two_level_labels(1, 2, 3))
    save_arrays(tmp_path / "train.pkl", random_images(6), two_level_labels(1, 2, 3))
    with pytest.raises(UserError, match=r"dataset.train_file=train matches .*train.npz and .*train.pkl"):
        check_config(maxl_config(tmp_path))
    with pytest.raises(UserError, match=r"dataset.test_file=test: nothing under .* \(test/, test.npz, test.pkl"):
        check_config(maxl_config(tmp_path, "dataset.train_file=train.npz"))
    (tmp_path / "test.csv").write_text("file,level\nmissing.png,0\n")
    with pytest.raises(UserError, match=r"test.csv: 1 listed image file\(s\) do not exist, e.g. .*missing.png"):
        check_config(maxl_config(tmp_path, "dataset.train_file=train.npz"))
    (tmp_path / "test.csv").write_text("image,level\nmissing.png,0\n")
    with pytest.raises(UserError, match=r"the first line must name the columns: 'file'"):
        check_config(maxl_config(tmp_path, "dataset.train_file=train.npz"))
    with pytest.raises(UserError, match=r"dataset.per_class=0: give a number of images per class"):
        check_config(maxl_config(tmp_path, "dataset.per_class=0"))
    cfg = maxl_config(tmp_path, "dataset.train_file=train.npz", "dataset.test_file=train.pkl", "primary_level=1")
    check_config(cfg)  # a level given at the top names the subset's level too
    assert (cfg.dataset.primary_level, cfg.auxiliary_level) == (1, 2)


# ---- dataset=custom ------------------------------------------------------------------------------------------

def custom_config(directory, **overrides):
    return dataset_config("custom", path=str(directory), **overrides)


def flat_labels(n_classes, per_class, first=0, step=1):
    return np.repeat(np.arange(n_classes) * step + first, per_class)


def test_custom_arrays_under_other_names_with_a_carved_val_split(tmp_path, caplog):
    train_labels, train_images = flat_labels(10, 3, first=100), random_images(30, 1)
    save_arrays(tmp_path / "base.npz", train_images, train_labels)
    save_arrays(tmp_path / "novel.pkl", random_images(12, 2), flat_labels(4, 3, step=5))  # ids 0, 5, 10, 15
    cfg = custom_config(tmp_path, train_file="base", test_file="novel.pkl", image_size=SIZE)
    check_fewshot_config(cfg)
    with caplog.at_level(logging.INFO, logger="metalabel"):
        train, val, test = (load_split(cfg, split)[0].flat for split in ("train", "val", "test"))
    # val: 20% of the 10 training classes, drawn with dataset.seed; train keeps the other 8
    val_ids = np.sort(np.random.default_rng([0, own_data.CARVE_STREAM]).choice(np.arange(100, 110), 2, replace=False))
    rows = np.isin(train_labels, val_ids)
    np.testing.assert_array_equal(val.images, train_images[rows])
    np.testing.assert_array_equal(train.images, train_images[~rows])
    np.testing.assert_array_equal(val.labels, np.searchsorted(val_ids, train_labels[rows]))
    assert (train.n_cls, val.n_cls, test.n_cls) == (8, 2, 4)  # ids renumbered without gaps
    assert "no val split (dataset.val_file=val): 2 of the 10 training classes" in caplog.text
    assert f"val classes: {val_ids[0]}, {val_ids[1]}" in caplog.text
    assert "label ids run 0..15 with 12 unused in between: renumbered 0..3" in caplog.text
    other = load_split(custom_config(tmp_path, train_file="base", test_file="novel.pkl", val_file=None,
                                     val_classes=3, seed=1), "val")[0].flat
    assert other.n_cls == 3
    with pytest.raises(UserError, match=r"dataset.val_file=myval: nothing under"):
        check_fewshot_config(custom_config(tmp_path, train_file="base", test_file="novel.pkl", val_file="myval"))


def write_class_folders(root, classes, per_class, seed):
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (10 + i, 8 + i, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_custom_folders_subset_decodes_only_the_images_kept(tmp_path, monkeypatch):
    write_class_folders(tmp_path / "seen", ["a", "b", "c", "d", "e"], 4, 1)
    write_class_folders(tmp_path / "val", ["f", "g", "h"], 4, 2)
    write_class_folders(tmp_path / "unseen", ["i", "j", "k"], 4, 3)
    decoded = []
    real_decode = own_data._decode
    monkeypatch.setattr(own_data, "_decode", lambda path, size: decoded.append(path) or real_decode(path, size))
    cfg = custom_config(tmp_path, train_file="seen", test_file="unseen", image_size=16, per_class=2,
                        classes={"train": 3, "val": ["f", "h"]})
    check_fewshot_config(cfg)
    train, val, test = (load_split(cfg, split)[0].flat for split in ("train", "val", "test"))
    assert (len(train), train.n_cls, len(val), val.n_cls, len(test), test.n_cls) == (6, 3, 4, 2, 6, 3)
    assert len(decoded) == 16 and {p.parent.name for p in decoded if p.parts[-3] == "val"} == {"f", "h"}
    val_files = [p for p in decoded if p.parts[-3] == "val"]
    expected = [np.asarray(Image.open(p).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)) for p in val_files]
    np.testing.assert_array_equal(val.images, np.stack(expected))
    np.testing.assert_array_equal(val.labels, [0 if p.parent.name == "f" else 1 for p in val_files])


def test_custom_arrays_of_the_right_size_stay_memory_mapped_and_others_are_resized(tmp_path):
    for split, seed in (("train", 1), ("val", 2), ("test", 3)):
        save_arrays(tmp_path / f"{split}.npz", random_images(6, seed), flat_labels(2, 3))
    kept = load_split(custom_config(tmp_path, image_size=SIZE), "val")[0].flat
    assert isinstance(kept.images, np.memmap)
    bigger = load_split(custom_config(tmp_path, image_size=20), "val")[0].flat
    np.testing.assert_array_equal(bigger.images, resized(random_images(6, 2), 20))
    grey = random_images(6, 4)[..., 0]
    save_arrays(tmp_path / "test.npz", grey, flat_labels(2, 3))
    as_rgb = load_split(custom_config(tmp_path, image_size=SIZE), "test")[0].flat
    np.testing.assert_array_equal(as_rgb.images, np.repeat(grey[..., None], 3, axis=3))


def test_subset_keys_work_on_every_few_shot_dataset(tmp_path, monkeypatch):
    from mela_data_layouts import write_mini_imagenet

    monkeypatch.setenv("WORKSPACE", str(tmp_path))
    write_mini_imagenet(tmp_path / "metaL_data" / "miniImageNet", {"train": 6, "val": 5, "test": 5}, 8)
    flat = load_split(dataset_config("miniImageNet", classes=3, per_class=4), "val")[0].flat
    assert (len(flat), flat.n_cls) == (12, 3) and np.bincount(flat.labels).tolist() == [4, 4, 4]


BAD_CUSTOM = {
    "negative labels": (lambda p: save_arrays(p, random_images(4), np.array([0, 1, -2, 1])),
                        r"label -2 at row 2 is negative"),
    "lengths differ": (lambda p: save_arrays(p, random_images(4), np.zeros(5, int)), r"4 images but 5 labels"),
    "several label columns": (lambda p: save_arrays(p, random_images(4), np.zeros((4, 2), int)),
                              r"'labels' has 2 columns; few-shot data needs one class id per image"),
    "wrong shape": (lambda p: save_arrays(p, random_images(4)[..., :2], np.zeros(4, int)),
                    r"'data' has shape \(4, 12, 12, 2\)"),
    "truncated": (truncated_npz, r"is truncated or not an .npz file"),
}


@pytest.mark.parametrize("case", BAD_CUSTOM)
def test_bad_custom_files_are_one_line_errors_naming_the_file(case, tmp_path):
    write, message = BAD_CUSTOM[case]
    write(tmp_path / "train.npz")
    with pytest.raises(UserError, match=message) as excinfo:
        load_split(custom_config(tmp_path, val_file=None), "train")
    assert str(tmp_path / "train.npz") in one_line(excinfo)


def test_html_pickle_and_bad_custom_settings(tmp_path):
    (tmp_path / "train.pkl").write_bytes(b"<html><body>login</body></html>")
    with pytest.raises(UserError, match=r"train.pkl is an HTML page"):
        load_split(custom_config(tmp_path), "train")
    with pytest.raises(UserError, match=r"dataset=custom needs its directory: add dataset.path=DIR"):
        check_fewshot_config(dataset_config("custom"))
    with pytest.raises(UserError, match=r"dataset.classes=\[1, 2\]: give a number of classes per split, or per split"):
        check_fewshot_config(custom_config(tmp_path, classes=[1, 2]))
    save_arrays(tmp_path / "train.npz", random_images(4), np.array([0, 0, 1, 1]))
    (tmp_path / "train.pkl").unlink()
    save_arrays(tmp_path / "test.npz", random_images(4), np.array([0, 0, 1, 1]))
    with pytest.raises(UserError, match=r"dataset.val_classes=0: give a number of classes"):
        check_fewshot_config(custom_config(tmp_path, val_classes=0))
    with pytest.raises(UserError, match=r"dataset.val_classes=2: carving a val split from the 2 classes"):
        load_split(custom_config(tmp_path, val_classes=2), "val")


# ---- own data never reads outside its folder; a decompression bomb is one line -------------------------------

def test_a_csv_listing_files_outside_its_folder_is_refused_before_any_is_opened(tmp_path, monkeypatch):
    from PIL import Image

    from dataset import own_data

    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    opened = []
    monkeypatch.setattr(own_data.Image, "open", lambda *a, **k: opened.append(a) or Image.open(*a, **k))
    for listed in ("../outside.png", str(tmp_path / "outside.png"), "../../etc/passwd"):
        (folder / "train.csv").write_text(f"file,level\n{listed},0\n")
        with pytest.raises(UserError, match=f"train.csv line 2: .* leads outside {folder}"):
            own_data.read_levels_csv(folder / "train.csv")
    assert opened == []


def test_a_class_folder_or_image_that_links_outside_is_refused(tmp_path):
    from PIL import Image

    from dataset.own_data import list_class_folders

    split = tmp_path / "train"
    (split / "cat").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(split / "cat" / "a.png")
    (split / "etc").symlink_to("/etc")
    with pytest.raises(UserError, match="class folder etc: .* leads outside"):
        list_class_folders(split)
    (split / "etc").unlink()
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    (split / "cat" / "b.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(UserError, match="image b.png: .* leads outside"):
        list_class_folders(split)


def test_a_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    from PIL import Image

    from dataset.own_data import ImageFiles

    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # 64x64 is over twice the limit
    with pytest.raises(UserError, match="bomb.png is refused as a decompression bomb"):
        ImageFiles([tmp_path / "bomb.png"]).decode(8, "train")
