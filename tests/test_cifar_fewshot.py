"""dataset=cifar_fs and dataset=fc100: the published splits read from a generated archive in CIFAR-100's python
layout, MetaOptNet's pickles read the same, bad archives refused in one line, and `make mela_cifar` at toy scale."""
import json
import pickle
import shutil

import numpy as np
import pytest
from cifar_fewshot_data import COARSE_NAMES, FINE_NAMES, HIERARCHY, write_cifar100, write_metaoptnet_pickles
from conftest import ROOT, one_line_error, run_script
from test_presets import TOY

from dataset.fewshot import cifar_fewshot
from dataset.fewshot.sources import check_config, load_split, load_supervised_set
from engine.entry import compose
from engine.errors import UserError
from methods.scripts import SCRIPTS
from tools.study import main as study_main

SPLITS = ("train", "val", "test")
# The published splits, written out independently of the shipped files: CIFAR-FS's val and test fine classes
# (train: the other 64), FC100's superclasses by their index in the archive's coarse order.
CIFAR_FS_VAL = {"beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea", "camel",
                "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor"}
CIFAR_FS_TEST = {"whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard",
                 "plain", "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle", "pickup_truck",
                 "rocket"}
FC100_SUPERCLASSES = {"train": {1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19}, "val": {8, 11, 13, 16}, "test": {0, 7, 12, 14}}
SIZES = {"cifar_fs": {"train": 64, "val": 16, "test": 20}, "fc100": {"train": 60, "val": 20, "test": 20}}
PER_CLASS = 10  # 8 in the archive's train file, 2 in its test file


def published_fine_classes(benchmark: str) -> dict[str, set[str]]:
    if benchmark == "cifar_fs":
        return {"train": set(FINE_NAMES) - CIFAR_FS_VAL - CIFAR_FS_TEST, "val": CIFAR_FS_VAL, "test": CIFAR_FS_TEST}
    return {split: {name for c in supers for name in HIERARCHY[COARSE_NAMES[c]]}
            for split, supers in FC100_SUPERCLASSES.items()}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cifar") / "metaL_data"
    write_cifar100(directory / "cifar-100-python")
    return directory


def dataset_cfg(name, data_dir, *overrides):
    return compose(SCRIPTS["learn_meta_repr"], [f"dataset={name}", f"data_dir={data_dir}", *overrides]).dataset


def read(cfg, split):
    [(name, images, labels, names)] = cifar_fewshot.read(cfg, split)
    return images, labels, names


def test_shipped_splits_are_the_published_ones():
    for benchmark, sizes in SIZES.items():
        shipped = cifar_fewshot.published_splits(benchmark)
        assert {split: len(names) for split, names in shipped.items()} == (
            sizes if benchmark == "cifar_fs" else {"train": 12, "val": 4, "test": 4})
        listed = sum(shipped.values(), [])
        assert len(set(listed)) == len(listed)  # no class in two splits
        names = FINE_NAMES if benchmark == "cifar_fs" else COARSE_NAMES
        assert set(listed) == set(names)
        if benchmark == "fc100":
            assert {s: {COARSE_NAMES.index(n) for n in shipped[s]} for s in SPLITS} == FC100_SUPERCLASSES
        else:
            assert {s: set(shipped[s]) for s in SPLITS} == published_fine_classes("cifar_fs")
        facts = ROOT.parent / "shared" / "data" / "cifar_fewshot" / f"{benchmark}_splits.json"
        if facts.is_file():  # the copy the project was given
            assert json.loads(facts.read_text()) == shipped


@pytest.mark.parametrize("benchmark", ["cifar_fs", "fc100"])
def test_splits_read_from_the_archive_are_the_published_ones(data_dir, benchmark):
    cfg = dataset_cfg(benchmark, data_dir)
    check_config(cfg)
    published, seen = published_fine_classes(benchmark), set()
    for split in SPLITS:
        images, labels, names = read(cfg, split)
        assert set(names) == published[split] and len(names) == SIZES[benchmark][split]
        assert names == sorted(names)  # the archive's order
        assert not seen & set(names)
        seen |= set(names)
        assert images.shape == (SIZES[benchmark][split] * PER_CLASS, 32, 32, 3) and images.dtype == np.uint8
        assert np.array_equal(np.bincount(labels), np.full(len(names), PER_CLASS))  # train and test files together
    assert len(seen) == 100
    # through the scripts' loaders: labels 0..K-1, normalised 32x32 tensors
    [sub] = load_split(cfg, "val")
    images, labels = sub.flat.load([0, len(sub.flat) - 1])
    assert tuple(images.shape) == (2, 3, 32, 32) and labels.tolist() == [0, SIZES[benchmark]["val"] - 1]
    assert load_supervised_set(cfg, "train").labels.max() == SIZES[benchmark]["train"] - 1


def test_the_images_are_the_archives_own(data_dir):
    """Each image read for a class is one of the archive's images of that fine class."""
    cfg = dataset_cfg("cifar_fs", data_dir)
    images, labels, names = read(cfg, "test")
    batch = pickle.loads((data_dir / "cifar-100-python" / "test").read_bytes())
    fine = np.asarray(batch["fine_labels"])
    archive = np.asarray(batch["data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    rose = FINE_NAMES.index("rose")
    ours = images[labels == names.index("rose")]
    assert any(np.array_equal(ours[-1], image) for image in archive[fine == rose])


@pytest.mark.parametrize("benchmark", ["cifar_fs", "fc100"])
def test_metaoptnet_pickles_load_with_the_same_classes_and_counts(data_dir, tmp_path, benchmark):
    cfg = dataset_cfg(benchmark, data_dir)
    parts = [read(cfg, split) for split in SPLITS]
    images = np.concatenate([p[0] for p in parts])
    fine = np.concatenate([np.asarray([FINE_NAMES.index(p[2][i]) for i in p[1]]) for p in parts])
    prefix = cifar_fewshot.BENCHMARKS[benchmark].pickle_prefix
    folder = tmp_path / ("CIFAR-FS" if benchmark == "cifar_fs" else "FC100")
    write_metaoptnet_pickles((images, fine), folder, prefix,
                             {s: sorted(published_fine_classes(benchmark)[s]) for s in SPLITS})
    pickled = dataset_cfg(benchmark, data_dir, "dataset.path=null", f"dataset.pickle_path={folder}")
    for split, (arch_images, arch_labels, arch_names) in zip(SPLITS, parts):
        images, labels, names = read(pickled, split)
        assert names == arch_names
        assert np.array_equal(np.bincount(labels), np.bincount(arch_labels))
        for k in range(len(names)):  # the same images per class, in another order
            ours = {image.tobytes() for image in images[labels == k]}
            assert ours == {image.tobytes() for image in arch_images[arch_labels == k]}
    # without the archive (a data_dir without cifar-100-python) the pickles are found by the default path
    shutil.copytree(folder, tmp_path / "only_pickles" / folder.name)
    default = dataset_cfg(benchmark, tmp_path / "only_pickles")
    assert read(default, "val")[2] == parts[1][2]
    # a pickle of another split: the class count does not match
    shutil.copy(folder / f"{prefix}_train.pickle", folder / f"{prefix}_test.pickle")
    with pytest.raises(UserError, match=rf"{prefix}_test.pickle: {SIZES[benchmark]['train']} classes, .* test split "
                                        rf"has {SIZES[benchmark]['test']}"):
        read(pickled, "test")


def refused(cfg, split="train") -> str:
    with pytest.raises(UserError) as caught:
        cifar_fewshot.read(cfg, split)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_wrong_or_truncated_archives_are_refused_in_one_line(data_dir, tmp_path):
    archive = tmp_path / "cifar-100-python"
    shutil.copytree(data_dir / "cifar-100-python", archive)
    cfg = dataset_cfg("cifar_fs", tmp_path, f"dataset.path={archive}", "dataset.pickle_path=null")
    # the generated stand-in's names (fine0..fine99): another archive, not relabelled silently
    meta = {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": COARSE_NAMES}
    (archive / "meta").write_bytes(pickle.dumps(meta))
    assert "no fine class 'dolphin', 'seal', 'aquarium_fish' of CIFAR-FS's train split among its 100 fine classes: " \
           "not the CIFAR-100 archive" in refused(cfg)
    fc100 = dataset_cfg("fc100", tmp_path, f"dataset.path={archive}", "dataset.pickle_path=null")
    (archive / "meta").write_bytes(pickle.dumps({"fine_label_names": FINE_NAMES, "coarse_label_names": ["x"] * 20}))
    assert "no coarse class 'fish'" in refused(fc100)
    # CIFAR-10's meta file
    (archive / "meta").write_bytes(pickle.dumps({"label_names": ["airplane"] * 10}))
    assert refused(cfg).endswith("meta: no 'fine_label_names' list: not the CIFAR-100 python archive (run `make "
                                 "download_cifar100`)")
    shutil.copy(data_dir / "cifar-100-python" / "meta", archive / "meta")
    # a truncated train file
    raw = (archive / "train").read_bytes()
    (archive / "train").write_bytes(raw[: len(raw) // 2])
    assert f"{archive / 'train'} is truncated or not a pickle" in refused(cfg)
    # a train file holding only part of the classes
    batch = pickle.loads(raw)
    keep = [i for i, f in enumerate(batch["fine_labels"]) if f != FINE_NAMES.index("dolphin")]
    part = {"data": batch["data"][keep], "fine_labels": [batch["fine_labels"][i] for i in keep],
            "coarse_labels": [batch["coarse_labels"][i] for i in keep]}
    (archive / "train").write_bytes(pickle.dumps(part))
    test = pickle.loads((archive / "test").read_bytes())
    keep = [i for i, f in enumerate(test["fine_labels"]) if f != FINE_NAMES.index("dolphin")]
    (archive / "test").write_bytes(pickle.dumps({"data": test["data"][keep],
                                                 "fine_labels": [test["fine_labels"][i] for i in keep],
                                                 "coarse_labels": [test["coarse_labels"][i] for i in keep]}))
    assert "CIFAR-FS's train split has 64 fine classes with images, the archive gives no image of dolphin" \
        in refused(cfg)
    # nothing there at all
    shutil.rmtree(archive)
    assert refused(cfg) == f"missing data file {archive / 'meta'} (run `make download_cifar100` for the CIFAR-100 " \
                           f"archive)"
    with pytest.raises(UserError, match="dataset.splits=cifar10: choose one of cifar_fs, fc100"):
        check_config(dataset_cfg("cifar_fs", tmp_path, "dataset.splits=cifar10"))


def test_a_script_names_the_missing_archive_in_one_line(tmp_path):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    result = run_script("learn_meta_repr.py", "dataset=fc100", "device=cpu", "epochs=1", cwd=tmp_path,
                        workspace=workspace)
    line = one_line_error(result)
    assert "cifar-100-python/meta" in line and "make download_cifar100" in line


def test_mela_cifar_preset_at_toy_scale(data_dir, tmp_path, workspace, studies_in_process, monkeypatch, capsys):
    """`make mela_cifar` (tools/study.py, as make runs it): both datasets, every MeLa script, meta_eval 1- and 5-shot
    of each step, the table."""
    study = tmp_path / "study"
    args = [*TOY, f"data_dir={data_dir}", "test_db_size=5", "n_queries=5", "batch_size=50",
            "learn_labeler:no_replacement=false", "learn_labeler:train_db_size=60", "learn_labeler:n_queries=2",
            "learn_labeler:std_factor=10",
            "learn_labeler:sup_rotate_aug=false", "sup_baseline:rotate_aug=false"]
    variables = dict(STUDY_DIR=study, NAME="toy", SEEDS="0",
                     ARGS=" ".join([*args, "learn_labeler:K=30"]))  # 64 classes in 60 random tasks: K=10 prunes to nothing
    for variable, value in variables.items():
        monkeypatch.setenv(variable, str(value))
    monkeypatch.chdir(tmp_path)
    assert study_main(["mela_cifar"]) == 0, capsys.readouterr()
    document = json.loads((study / "table.json").read_text())
    assert document["metrics"] == ["test/1shot", "test/5shot"]
    for benchmark in SIZES:
        chain = study / f"{benchmark}_resnet12_s0"
        for step in ("learn_meta_repr", "learn_labeler", "fine_tune", "sup_baseline"):
            results = json.loads((chain / "eval" / step / "results.json").read_text())
            assert set(results["results"]) == {"1", "5"}
        config = (chain / "train" / "learn_labeler" / "config.yaml").read_text()
        assert "dropblock_size: 2" in config and "K: 30" in config
    groups = {tuple(sorted(g["settings"].items())) for g in document["groups"]}
    assert len(groups) == 8, groups  # 2 datasets x 4 steps
