"""Own data end to end: maxl_train.py on a hier_file dataset and learn_meta_repr.py on a custom one, both under
other file names, with subsets and (MeLa) a carved val split, at toy size."""
import math
import pickle

import numpy as np
import torch
from conftest import one_line_error, run_in_process
from PIL import Image

from engine.metrics import read_metrics

TINY = ["device=cpu", "num_workers=0", "progress=false"]


def test_maxl_trains_on_a_hier_file_subset_with_levels_read_from_the_files(tmp_path, workspace):
    rng = np.random.default_rng(0)
    data = tmp_path / "mydata"
    data.mkdir()
    for name, per_fine in (("base.npz", 5), ("holdout.pkl", 2)):  # 4 coarse x 3 fine classes
        fine = np.repeat(np.arange(12), per_fine)
        arrays = {"data": rng.integers(0, 256, (len(fine), 16, 16, 3), dtype=np.uint8),
                  "labels": np.stack([fine // 3, fine], axis=1)}
        if name.endswith(".npz"):
            np.savez(data / name, **arrays)
        else:
            (data / name).write_bytes(pickle.dumps(arrays))
    result = run_in_process("maxl_train.py", "dataset=hier_file", f"dataset.path={data}", "dataset.train_file=base",
                        "dataset.test_file=holdout.pkl", "dataset.classes=2", "dataset.per_class=3", "method=maxl",
                        "epochs=1", "model.width_mult=0.0625", "batch_size=50", "cossim_every=3", "name=own", *TINY,
                        cwd=tmp_path, workspace=workspace)
    assert result.returncode == 0, result.stderr
    # 2 of 4 coarse classes, each with its 3 fine classes; at most 3 training images per fine class
    assert "kept 2 of 4 classes" in result.stderr
    assert "maxl, psi=[3, 3]: 18 training and 12 test images" in result.stderr
    assert "stored at 16x16, resized to 32x32" in result.stderr
    [metrics] = (tmp_path / "logs" / "maxl_train" / "own").glob("*/metrics.csv")
    [row] = read_metrics(metrics)
    assert 0 <= row["test/acc"] <= 1 and math.isfinite(row["train/loss"])
    payload = torch.load(workspace / "checkpoint" / "maxl" / "own" / "last.pt", weights_only=True)
    assert "primary_level: 4" in payload["config"] and "auxiliary_level: 12" in payload["config"]


def test_maxl_without_the_data_folder_is_one_line(tmp_path, workspace):
    result = run_in_process("maxl_train.py", "dataset=hier_file", *TINY, cwd=tmp_path, workspace=workspace)
    assert "dataset.path" in one_line_error(result)
    assert not (tmp_path / "logs" / "maxl_train").exists()


def test_meta_learning_on_custom_folders_and_arrays_with_a_carved_val_split(tmp_path, workspace):
    rng = np.random.default_rng(0)
    data = tmp_path / "mydata"
    for c in range(6):
        (data / "seen" / f"class{c}").mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(data / "seen" / f"class{c}" / f"{i}.png")
    np.savez(data / "novel.npz", data=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
             labels=np.repeat([3, 7, 9], 4))
    result = run_in_process("learn_meta_repr.py", "dataset=custom", f"dataset.path={data}", "dataset.train_file=seen",
                        "dataset.test_file=novel", "dataset.val_classes=2", "dataset.per_class=4",
                        "dataset.image_size=32", "model.width_mult=0.125", "n_ways=2", "n_shots=1", "n_queries=1",
                        "val_n_ways=2", "val_n_shots=[1]", "test_db_size=4", "epochs=1", "name=own", *TINY,
                        cwd=tmp_path, workspace=workspace)
    assert result.returncode == 0, result.stderr
    assert "no val split (dataset.val_file=val): 2 of the 6 training classes" in result.stderr
    assert "at most 4 images per class (dataset.per_class" in result.stderr
    [metrics] = (tmp_path / "logs" / "learn_meta_repr" / "own").glob("*/metrics.csv")
    [row] = read_metrics(metrics)
    assert 0 <= row["val/1shot"] <= 1
    assert (workspace / "checkpoint" / "label_learn" / "saves" / "own" / "best.pt").is_file()


def test_a_run_refused_on_its_data_leaves_no_log_folder(tmp_path, workspace):
    """A data check that only fails once the run has started (an image that cannot be decoded) is one line, and
    the run's log folder is removed: `tools.report` lists no unfinished run."""
    from PIL import Image

    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    lines = ["file,group,kind"]
    for i, (group, kind) in enumerate([("a", "x"), ("a", "y"), ("b", "z"), ("b", "w")] * 2):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(data / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{group},{kind}")
    (data / "train.csv").write_text("\n".join(lines) + "\n")
    (data / "img" / "bad.png").write_text("not an image")
    (data / "test.csv").write_text("file,group,kind\nimg/bad.png,a,x\nimg/0.png,a,x\n")
    result = run_in_process("maxl_train.py", "dataset=hier_file", f"dataset.path={data}", "dataset.image_size=8",
                        "method=single", "device=cpu", "progress=false", "num_workers=0", "model.width_mult=0.0625",
                        "batch_size=4", "epochs=1", cwd=tmp_path, workspace=workspace)
    assert "bad.png is not a readable image" in one_line_error(result)
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("*.log"))
