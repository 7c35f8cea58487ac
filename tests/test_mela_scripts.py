"""The five MeLa scripts end to end on the generated `synthetic_fs` data with a tiny ResNet-12, chained through
their real artefacts."""
import json

import pytest
import torch
from conftest import one_line_error, run_in_process

from engine.metrics import read_metrics

TINY = ["dataset=synthetic_fs", "model.width_mult=0.125", "device=cpu", "num_workers=0", "progress=false",
        "test_db_size=4"]
TRAIN = [*TINY, "epochs=1"]
SAVES = ("checkpoint", "label_learn", "saves")


def saves(workspace, name):
    return workspace.joinpath(*SAVES, name)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """learn_meta_repr -> learn_labeler -> fine_tune, and sup_baseline, once for the module's tests."""
    root = tmp_path_factory.mktemp("chain")
    workspace = root / "workspace"
    workspace.mkdir()
    steps = {
        "learn_meta_repr": [*TRAIN, "name=lmr"],
        "learn_labeler": [*TRAIN, "name=ll", "pretrained_labeler=lmr", "K=20", "no_replacement=false",
                          "train_db_size=20", "n_queries=5", "batch_size=50", "sup_rotate_aug=false"],
        "fine_tune": [*TRAIN, "name=ft", "pretrained_model=ll"],
        "sup_baseline": [*TRAIN, "name=sb", "batch_size=50"],
    }
    results = {script: run_in_process(f"{script}.py", *args, cwd=root, workspace=workspace)
               for script, args in steps.items()}
    return root, workspace, results


def test_each_training_step_writes_its_checkpoints_and_metrics(chain):
    root, workspace, results = chain
    for script, name, prefix in (("learn_meta_repr", "lmr", ""), ("learn_labeler", "ll", "backbone."),
                                 ("fine_tune", "ft", "backbone."), ("sup_baseline", "sb", "backbone.")):
        assert results[script].returncode == 0, results[script].stderr
        payload = torch.load(saves(workspace, name) / "best.pt", weights_only=True)
        assert payload["script"] == script and "model:" in payload["config"]
        # where the backbone is in state["model"], for the next step and meta_eval
        assert payload["backbone_prefix"] == prefix and payload["resfc_head"] == (script == "fine_tune")
        [metrics] = (root / "logs" / script / name).glob("*/metrics.csv")
        [row] = read_metrics(metrics)
        assert 0 <= row["val/5shot"] <= 1 and row["val/5shot_ci95"] >= 0
    # learn_meta_repr saves the backbone itself; fine_tune its frozen backbone and ResFC head
    lmr = torch.load(saves(workspace, "lmr") / "best.pt", weights_only=True)["state"]["model"]
    assert any(k.startswith("layers.0") for k in lmr)
    ft = torch.load(saves(workspace, "ft") / "best.pt", weights_only=True)["state"]["model"]
    assert any(k.startswith("head.") for k in ft) and any(k.startswith("backbone.layers") for k in ft)
    ll = torch.load(saves(workspace, "ll") / "best.pt", weights_only=True)["state"]["model"]
    # fine_tune left the weights of the backbone it was given untouched (DropBlock's counter counts forwards)
    for key, value in ll.items():
        if key.startswith("backbone.") and value.is_floating_point():
            assert torch.equal(ft[key], value), key


def test_labeler_reports_what_it_found(chain):
    root, workspace, results = chain
    report = json.loads((saves(workspace, "ll") / "labeler.json").read_text())
    assert report["true_classes"] == 10 and report["clusters"] >= 1
    assert 0 <= report["accuracy"] <= 1 and 0 <= report["nmi"] <= 1 and 0 <= report["rejected_tasks"] <= 1
    assert sum(report["cluster_sizes"]) > 0
    centroids = torch.load(saves(workspace, "ll") / "centroids.pt", weights_only=True)
    assert centroids["centroids"].shape[1] == 80  # 640 x width 0.125
    [png] = (root / "logs" / "learn_labeler" / "ll").glob("*/cluster_sizes.png")
    assert png.stat().st_size > 0
    assert "clusters for 10 true classes" in results["learn_labeler"].stderr


def test_meta_eval_prints_and_writes_intervals(chain):
    root, workspace, _ = chain
    for name in ("lmr", "ll", "ft", "sb"):
        result = run_in_process("meta_eval.py", *TINY, f"pretrained_model={name}", f"hydra.run.dir=eval_{name}",
                            cwd=root, workspace=workspace)
        assert result.returncode == 0, result.stderr
        saved = json.loads((root / f"eval_{name}" / "results.json").read_text())
        assert set(saved["results"]) == {"1", "5"} and saved["headline"] == ["test/1shot", "test/5shot"]
        for shots in ("1", "5"):
            overall = saved["results"][shots]["overall"]
            assert 0 <= overall["mean"] <= 1 and overall["ci95"] >= 0
        assert "1-shot" in result.stderr and "5-shot" in result.stderr and "+-" in result.stderr
        assert (root / f"eval_{name}" / "results.csv").read_text().startswith("shots,sub_dataset,mean,ci95")


@pytest.mark.parametrize("script, overrides, message", [
    ("learn_labeler.py", [], "pretrained_labeler is not set: give the run name or .pt path of a checkpoint "
                             "written by learn_meta_repr.py"),
    ("meta_eval.py", [], "pretrained_model is not set"),
    ("fine_tune.py", ["pretrained_model=nothing_here"], "no checkpoint at"),
    ("learn_meta_repr.py", ["n_ways=20"], "n_ways=20 but dataset synthetic_fs/train has only 10 classes"),
    ("learn_meta_repr.py", ["n_shots=20", "n_queries=15"], "n_shots=20 with n_queries=15 takes 35 images per class"),
])
def test_bad_inputs_fail_with_one_line(script, overrides, message, tmp_path, workspace):
    result = run_in_process(script, *TRAIN if script != "meta_eval.py" else TINY, *overrides, cwd=tmp_path,
                        workspace=workspace)
    assert message in one_line_error(result)


def test_checkpoint_of_another_architecture_or_step_is_refused(chain, tmp_path):
    root, workspace, _ = chain
    other = run_in_process("meta_eval.py", *TINY, "pretrained_model=lmr", "model=resnet18", "model.width_mult=0.125",
                       cwd=tmp_path, workspace=workspace)
    line = one_line_error(other)
    assert "holds a resnet12 backbone" in line and "run with model=resnet12" in line
    wrong_step = run_in_process("learn_labeler.py", *TRAIN, "pretrained_labeler=sb", cwd=tmp_path, workspace=workspace)
    assert "is a checkpoint of sup_baseline.py; pretrained_labeler takes one written by learn_meta_repr.py" in \
        one_line_error(wrong_step)
