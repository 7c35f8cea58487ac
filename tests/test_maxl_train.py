"""maxl_train.py end to end on the generated `synthetic_hier` data, with a tiny VGG."""
import math

import pytest
import torch
from conftest import one_line_error, run_in_process

from engine.metrics import read_metrics

BASE = ["model.width_mult=0.0625", "device=cpu", "num_workers=0", "progress=false", "batch_size=50", "cossim_every=3"]
TINY = ["dataset=synthetic_hier", "dataset.generate.train_per_class=4", *BASE]


METHODS = ["single", "human", "random", "maxl", "maxl_first_order"]


def test_each_method_trains_one_epoch_in_a_multirun_that_survives_a_failing_job(tmp_path, workspace):
    """`-m method=...`: one Hydra sweep over every method, each run in its own directory; a job with a bad value
    is recorded, the others run, and the sweep ends with exit status 1 and one line for the failed job."""
    result = run_in_process("maxl_train.py", "-m", f"method={','.join(METHODS)},nonexistent", "epochs=1", *TINY,
                        cwd=tmp_path, workspace=workspace)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    [failure] = [line for line in result.stderr.splitlines() if line.startswith("error: job ")]
    assert failure.startswith(f"error: job {len(METHODS)}_invalid (method=nonexistent epochs=1 ") and "method" in failure
    [sweep] = (tmp_path / "logs" / "multirun" / "maxl_train").iterdir()
    runs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0]))
    assert (runs[-1] / "error.txt").read_text().startswith("overrides: method=nonexistent")
    runs = runs[:-1]
    for i, (method, run) in enumerate(zip(METHODS, runs)):
        assert run.name.startswith(f"{i}_{method}_synthetic_hier_20-100_vgg16_w0.0625_s0_")
    for method, run in zip(METHODS, runs):
        assert (run / "config.yaml").is_file() and not (run / "curves.png").exists()  # one epoch: no curve
        log = (run / "maxl_train.log").read_text()
        assert log.count("summary:") == 1 and "epoch 1/1 (0:" in log and "elapsed, ETA 0:00:00)" in log
        assert list((run / "tensorboard" / "hparams").glob("events.out.tfevents.*"))  # settings in HPARAMS
        checkpoint_dir = workspace / "checkpoint" / "maxl" / run.name.split("_", 1)[1]
        assert (checkpoint_dir / "last.pt").is_file() and (checkpoint_dir / "best.pt").is_file()
        [row] = read_metrics(run / "metrics.csv")
        expected = {"epoch", "lr", "train/loss", "train/acc", "test/loss", "test/acc", "time_s"}
        if method != "single":
            expected |= {"train/aux_loss", "train/cossim"}
        if method in ("maxl", "maxl_first_order"):
            expected |= {"meta/pre_loss", "meta/pre_acc", "meta/after_loss", "meta/after_acc", "gen/entropy",
                         "gen/nmi", "gen/purity"}
        assert expected <= set(row), (method, sorted(row))
        assert all(math.isfinite(v) for v in row.values()), method
        assert 0 <= row["test/acc"] <= 1
        if method != "single":
            assert -1 <= row["train/cossim"] <= 1
        payload = torch.load(checkpoint_dir / "last.pt", weights_only=True)
        assert payload["epoch"] == 0 and f"method: {method}" in payload["config"]


@pytest.mark.parametrize("overrides, message", [
    (["psi=[5,5,5]"], "psi has 3 entries but the primary level has 20 classes"),
    (["primary_level=7"], "primary_level=7 is not a level of dataset synthetic_hier"),
    (["dataset=cifar100"], "missing data file"),
])
def test_bad_inputs_fail_with_one_line(overrides, message, tmp_path, workspace):
    settings = BASE if overrides == ["dataset=cifar100"] else TINY
    result = run_in_process("maxl_train.py", *settings, "epochs=1", *overrides, cwd=tmp_path, workspace=workspace)
    line = one_line_error(result)
    assert message in line
    if overrides == ["dataset=cifar100"]:
        assert "cifar-100-python/train" in line and "make download_cifar100" in line


def test_corrupt_checkpoint_for_resume_is_refused_and_kept(tmp_path, workspace):
    last = workspace / "checkpoint" / "maxl" / "broken" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"not a checkpoint at all")
    result = run_in_process("maxl_train.py", *TINY, "epochs=1", "method=single", "name=broken", "resume=true",
                        cwd=tmp_path, workspace=workspace)
    assert "is corrupt or not a checkpoint" in one_line_error(result)
    assert last.read_bytes() == b"not a checkpoint at all"
    again = run_in_process("maxl_train.py", *TINY, "epochs=1", "method=single", "name=broken", "resume=false",
                       cwd=tmp_path, workspace=workspace)
    assert "exists from an earlier run" in one_line_error(again)
    assert last.read_bytes() == b"not a checkpoint at all"
