"""maxl_train.py end to end on the generated `synthetic_hier` data, with a tiny VGG."""
import math

import pytest
import torch

from conftest import one_line_error, run_script
from engine.metrics import NOT_COMPARED, read_metrics

BASE = ["model.width_mult=0.0625", "device=cpu", "num_workers=0", "progress=false", "batch_size=50", "cossim_every=3"]
TINY = ["dataset=synthetic_hier", "dataset.generate.train_per_class=4", *BASE]


def metrics_of(tmp_path, name):
    [csv] = (tmp_path / "logs" / "maxl_train" / name).glob("*/metrics.csv")
    return read_metrics(csv)


METHODS = ["single", "human", "random", "maxl", "maxl_first_order"]


def test_each_method_trains_one_epoch_in_a_multirun(tmp_path, workspace):
    """`-m method=...`: one Hydra sweep over every method, each run in its own directory."""
    result = run_script("maxl_train.py", "-m", f"method={','.join(METHODS)}", "epochs=1", *TINY, cwd=tmp_path,
                        workspace=workspace)
    assert result.returncode == 0, result.stderr
    [sweep] = (tmp_path / "logs" / "multirun" / "maxl_train").iterdir()
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [run.name for run in runs] == [f"{i}_{m}_synthetic_hier_20-100_vgg16_w0.0625_s0" for i, m in enumerate(METHODS)]
    for method, run in zip(METHODS, runs):
        assert (run / "config.yaml").is_file() and (run / "curves.png").stat().st_size > 0
        assert (run / "maxl_train.log").read_text().count("summary:") == 1
        checkpoint_dir = workspace / "checkpoint" / "maxl" / f"{method}_synthetic_hier_20-100_vgg16_w0.0625_s0"
        assert (checkpoint_dir / "last.pt").is_file() and (checkpoint_dir / "best.pt").is_file()
        [row] = read_metrics(run / "metrics.csv")
        expected = {"epoch", "train/loss", "train/acc", "test/loss", "test/acc", "time_s"}
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


def test_resumed_run_ends_with_the_same_metrics_as_an_uninterrupted_one(tmp_path, workspace):
    common = ["method=maxl", *TINY, "num_workers=1"]
    straight = run_script("maxl_train.py", *common, "epochs=2", "name=straight", cwd=tmp_path, workspace=workspace)
    assert straight.returncode == 0, straight.stderr
    first = run_script("maxl_train.py", *common, "epochs=1", "name=resumed", cwd=tmp_path, workspace=workspace)
    assert first.returncode == 0, first.stderr
    second = run_script("maxl_train.py", *common, "epochs=2", "name=resumed", "resume=true", cwd=tmp_path,
                        workspace=workspace)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr
    expected = metrics_of(tmp_path, "straight")
    [second_run] = sorted((tmp_path / "logs" / "maxl_train" / "resumed").glob("*/metrics.csv"))[-1:]
    got = read_metrics(second_run)
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected):
        assert {k: v for k, v in a.items() if k not in NOT_COMPARED} == \
               {k: v for k, v in b.items() if k not in NOT_COMPARED}
    final = [torch.load(workspace / "checkpoint" / "maxl" / n / "last.pt", weights_only=True)["state"]
             for n in ("straight", "resumed")]
    for key in ("model", "generator"):
        for name, tensor in final[0][key].items():
            assert torch.equal(tensor, final[1][key][name]), name


@pytest.mark.parametrize("overrides, message", [
    (["psi=[5,5,5]"], "psi has 3 entries but the primary level has 20 classes"),
    (["method=maxxl"], "unknown method 'maxxl'"),
    (["primary_level=7"], "primary_level=7 is not a level of dataset synthetic_hier"),
    (["dataset=cifar100"], "missing data file"),
])
def test_bad_inputs_fail_with_one_line(overrides, message, tmp_path, workspace):
    settings = BASE if overrides == ["dataset=cifar100"] else TINY
    result = run_script("maxl_train.py", *settings, "epochs=1", *overrides, cwd=tmp_path, workspace=workspace)
    line = one_line_error(result)
    assert message in line
    if overrides == ["dataset=cifar100"]:
        assert "cifar-100-python/train" in line and "make download_cifar100" in line


def test_corrupt_checkpoint_for_resume_is_refused_and_kept(tmp_path, workspace):
    last = workspace / "checkpoint" / "maxl" / "broken" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"not a checkpoint at all")
    result = run_script("maxl_train.py", *TINY, "epochs=1", "method=single", "name=broken", "resume=true",
                        cwd=tmp_path, workspace=workspace)
    assert "is corrupt or not a checkpoint" in one_line_error(result)
    assert last.read_bytes() == b"not a checkpoint at all"
    again = run_script("maxl_train.py", *TINY, "epochs=1", "method=single", "name=broken", cwd=tmp_path,
                       workspace=workspace)
    assert "exists from an earlier run" in one_line_error(again)
    assert last.read_bytes() == b"not a checkpoint at all"
