"""Several processes on CPU (gloo): the result equals one process on the same global batch. Where what the ranks
compute is the point, they are forked processes with torchrun's variables (tests/conftest.py: `run_ranks`);
torchrun runs the MAXL run that is stopped with SIGTERM (the signal passed on to the ranks is torchrun's)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_in_process, run_ranks, run_script_main
from test_preemption import interrupt_in_second_epoch
from tests_distributed_data import batch_and_nets

import methods.maxl as maxl
from engine.metrics import NOT_COMPARED, read_metrics

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29613"]


def on_two_ranks(script, *overrides, port, cwd, workspace):
    """The script as torchrun's two ranks would run it (forked: `run_ranks`)."""
    return run_ranks(run_script_main, script, *overrides, port=port, cwd=cwd, env={"WORKSPACE": str(workspace)})


def test_two_process_meta_gradient_equals_one_process_on_the_whole_batch(tmp_path):
    from distributed_meta_worker import main

    result = run_ranks(main, tmp_path, port=29611, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for first_order in (False, True):
        model, generator, x, y = batch_and_nets()
        expected, _ = maxl.meta_gradient(model, generator, x, y, 0.5, 0.2, 2.0, first_order=first_order)
        for rank in ranks:  # every rank ends with the same (summed) gradient
            for got, want in zip(rank[first_order], expected):
                assert torch.allclose(got, want, rtol=1e-9, atol=1e-15)


RUN = ["method=maxl", "dataset=synthetic_hier", "dataset.generate.train_per_class=2",
       "dataset.crop_padding=0", "dataset.hflip=false", "model.width_mult=0.0625", "model.batch_norm=false",
       "device=cpu", "num_workers=0", "progress=false", "batch_size=20", "cossim_every=4"]



def final_state(workspace, name):
    return torch.load(workspace / "checkpoint" / "maxl" / name / "last.pt", weights_only=True)


def run_metrics(tmp_path, name):
    return [read_metrics(p) for p in sorted((tmp_path / "logs" / "maxl_train" / name).glob("*/metrics.csv"))][-1]


def comparable(rows):
    return [{k: v for k, v in row.items() if k not in NOT_COMPARED} for row in rows]


def test_maxl_on_two_processes_equals_one_process_and_resumes_exactly(tmp_path, workspace):
    one = run_in_process("maxl_train.py", *RUN, "epochs=2", "name=one", cwd=tmp_path, workspace=workspace)
    assert one.returncode == 0, one.stderr
    two = on_two_ranks("maxl_train.py", *RUN, "epochs=2", "name=two", port=29612, cwd=tmp_path, workspace=workspace)
    assert two.returncode == 0, two.stderr[-3000:]
    # one run directory, written by rank 0 alone
    [run_dir] = (tmp_path / "logs" / "maxl_train" / "two").iterdir()
    assert (run_dir / "metrics.csv").is_file() and "2 processes" in (run_dir / "maxl_train.log").read_text()
    expected, got = final_state(workspace, "one")["state"], final_state(workspace, "two")["state"]
    for key in ("model", "generator"):
        for name, tensor in expected[key].items():
            assert torch.allclose(got[key][name], tensor, rtol=1e-4, atol=1e-6), (key, name)
    for a, b in zip(comparable(run_metrics(tmp_path, "one")), comparable(run_metrics(tmp_path, "two"))):
        assert a.keys() == b.keys()
        for key in a:
            # COSSIM averages per-row cosines, which for 1-d tensors are the signs of single gradient entries:
            # float rounding of entries near zero can flip a few of them.
            tolerance = 0.05 if key == "train/cossim" else 1e-5
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=tolerance), key

    # SIGTERM to torchrun in the second epoch (it passes the signal to both ranks), then the same command
    env = dict(os.environ, WORKSPACE=str(workspace), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    torchrun = subprocess.Popen([*TORCHRUN, str(ROOT / "maxl_train.py"), *RUN, "epochs=2", "name=resumed",
                                 "checkpoint_every=0.0001"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    _, output = interrupt_in_second_epoch(torchrun)
    assert "interrupted by SIGTERM at epoch 2/2 step " in output, output[-3000:]
    assert final_state(workspace, "resumed")["position"]["epoch"] == 1
    # the same command continues it: its ranks forked here (what they compute is the point now, not torchrun)
    second = on_two_ranks("maxl_train.py", *RUN, "epochs=2", "name=resumed", port=29614, cwd=tmp_path,
                          workspace=workspace)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed at epoch 2/2 step " in second.stderr
    assert comparable(run_metrics(tmp_path, "resumed")) == comparable(run_metrics(tmp_path, "two"))
    resumed = final_state(workspace, "resumed")["state"]
    for key in ("model", "generator"):
        for name, tensor in got[key].items():
            assert torch.equal(resumed[key][name], tensor), (key, name)


MELA = ["dataset=synthetic_fs", "model.width_mult=0.125", "device=cpu", "num_workers=0", "progress=false",
        "test_db_size=4"]


def test_mela_steps_run_on_two_processes_and_meta_eval_matches_one_process(tmp_path, workspace):
    steps = [("learn_meta_repr", ["epochs=1", "tasks_per_step=2", "name=lmr"]),
             ("learn_labeler", ["epochs=1", "name=ll", "pretrained_labeler=lmr", "K=20", "no_replacement=false",
                                "train_db_size=20", "batch_size=50", "sup_rotate_aug=false"]),
             ("meta_eval", ["pretrained_model=ll", "hydra.run.dir=two"])]
    for port, (script, args) in enumerate(steps, start=29621):
        result = on_two_ranks(f"{script}.py", *MELA, *args, port=port, cwd=tmp_path, workspace=workspace)
        assert result.returncode == 0, result.stderr[-3000:]
    labeler_log = next((tmp_path / "logs" / "learn_labeler" / "ll").glob("*/learn_labeler.log")).read_text()
    assert "2 processes" in labeler_log and "clusters for 10 true classes" in labeler_log
    one = run_in_process("meta_eval.py", *MELA, "pretrained_model=ll", "hydra.run.dir=one", cwd=tmp_path,
                     workspace=workspace)
    assert one.returncode == 0, one.stderr
    # the tasks split across ranks and gathered give the one-process results
    results = [json.loads((tmp_path / run / "results.json").read_text())["results"] for run in ("one", "two")]
    assert results[0] == results[1]


def test_submitit_launcher_tasks_become_ranks(tmp_path, workspace):
    """hydra/launcher=slurm's code path without SLURM: submitit's local executor with two tasks in one job."""
    from conftest import run_script

    result = run_script("maxl_train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                        "method=single", "epochs=1", *RUN[1:], "name=submitit", cwd=tmp_path, workspace=workspace)
    assert result.returncode == 0, result.stderr
    [log] = (tmp_path / "logs" / "multirun" / "maxl_train").glob("*/0_submitit/maxl_train.log")
    text = log.read_text()
    assert "2 processes" in text and text.count("summary:") == 1
    assert (workspace / "checkpoint" / "maxl" / "submitit" / "last.pt").is_file()
