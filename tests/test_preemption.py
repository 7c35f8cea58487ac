"""Orderly stops and exact continuation: a SIGTERM in the middle of the second of two epochs, then the same command,
ends with the same weights and metrics as an uninterrupted run, for every training script; and in-process, a stop
inside each of MAXL's two phases."""
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import Forked, run_in_process, run_script_main

from engine.errors import RunInterrupted
from engine.metrics import NOT_COMPARED, read_metrics

MAXL = ["dataset=synthetic_hier", "dataset.generate.train_per_class=2", "model.width_mult=0.0625", "device=cpu",
        "progress=false", "batch_size=25", "cossim_every=3", "method=maxl", "num_workers=1",
        "data_device=cpu"]
MELA = ["dataset=synthetic_fs", "dataset.generate.images_per_class=10", "model.width_mult=0.125", "device=cpu",
        "num_workers=0", "progress=false", "test_db_size=4", "n_queries=5", "data_device=cpu"]
SCRIPTS = {
    "maxl_train": ("maxl", MAXL),
    # 20 tasks an epoch: steps enough for the signal to land inside the second
    "learn_meta_repr": ("label_learn/saves", [*MELA, "n_shots=1", "n_queries=2", "no_replacement=false",
                                              "train_db_size=20"]),
    "learn_labeler": ("label_learn/saves", [*MELA, "pretrained_labeler=straight_learn_meta_repr", "K=20",
                                            "no_replacement=false", "train_db_size=10", "batch_size=25",
                                            "sup_rotate_aug=false"]),
    "sup_baseline": ("label_learn/saves", [*MELA, "batch_size=25"]),
}


def command(script, *overrides):
    """The script and its arguments, as after `python`."""
    return [f"{script}.py", *SCRIPTS[script][1], "epochs=2", *overrides]


def interrupt_in_second_epoch(process) -> tuple[int, str]:
    """Given a started run that checkpoints every few ms (`checkpoint_every=0.0001`; a `subprocess.Popen` with its
    output in `stdout`, or a `Forked`), send it SIGTERM once a checkpoint shows it inside its second epoch, and
    return (exit status, output)."""
    output, watcher = [], None

    def signal_once_inside_epoch_1(last):
        while process.poll() is None:
            try:
                position = torch.load(last, weights_only=True)["position"]
            except (OSError, RuntimeError, EOFError):
                position = None
            if position and position["epoch"] == 1:
                process.send_signal(signal.SIGTERM)
                return
            time.sleep(0.05)

    for line in process.stdout:
        output.append(line)
        if line.startswith("run: ") and watcher is None:
            last = Path(line.split("checkpoints: ")[1].strip()) / "last.pt"
            watcher = threading.Thread(target=signal_once_inside_epoch_1, args=(last,), daemon=True)
            watcher.start()
    return process.wait(timeout=300), "".join(output)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per script: an uninterrupted run, and an interrupted one continued by the same command."""
    root = tmp_path_factory.mktemp("preemption")
    env = dict(os.environ, WORKSPACE=str(root / "workspace"), PYTHONWARNINGS="ignore")
    done = {}
    for script in SCRIPTS:
        # The interrupted run needs a process of its own (it gets the signal); the others run in this one.
        straight = run_in_process(*command(script, f"name=straight_{script}"), cwd=root,
                                  workspace=root / "workspace")
        assert straight.returncode == 0, straight.stderr
        # a process forked from this one: it gets the signal, without a new interpreter's imports
        status, output = interrupt_in_second_epoch(Forked(run_script_main, *command(script, "checkpoint_every=0.0001"),
                                                          cwd=root, env=env, output=root / f"{script}.out"))
        run_name = next(line.split()[1] for line in output.splitlines() if line.startswith("run: "))
        folder = root / "workspace" / "checkpoint" / SCRIPTS[script][0] / run_name
        leftover = folder / f".last.pt.tmp{2**22 + 17}"  # what a write killed by SIGKILL leaves
        leftover.write_bytes(b"partial")
        continued = run_in_process(*command(script), cwd=root, workspace=root / "workspace")
        final = torch.load(folder / "last.pt", weights_only=True)
        continued_metrics = sorted((root / "logs" / script).glob(f"{run_name}/*/metrics.csv"))[-1]
        extended = None
        if script == "maxl_train":  # the same run extended by an epoch: epochs is not part of its name
            extended = run_in_process(*command(script), "epochs=3", cwd=root, workspace=root / "workspace")
        done[script] = dict(status=status, output=output, continued=continued, extended=extended, folder=folder,
                            leftover=leftover, final=final, continued_metrics=continued_metrics,
                            straight=root / "workspace" / "checkpoint" / SCRIPTS[script][0] / f"straight_{script}",
                            logs=root / "logs" / script)
    return done


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_sigterm_then_the_same_command_equals_an_uninterrupted_run(runs, script):
    run = runs[script]
    assert run["status"] == 128 + signal.SIGTERM, run["output"]
    assert "interrupted by SIGTERM at epoch 2/2 step " in run["output"], run["output"]
    assert "run the same command again to continue" in run["output"]
    assert run["continued"].returncode == 0, run["continued"].stderr
    assert "resumed at epoch 2/2 step " in run["continued"].stderr
    assert not run["leftover"].exists()
    final = run["final"]
    reference = torch.load(run["straight"] / "last.pt", weights_only=True)
    assert final["epoch"] == reference["epoch"] == 1 and final["position"] is None
    for key in reference["state"]:
        if key.endswith("model") or key == "generator":
            for name, tensor in reference["state"][key].items():
                assert torch.equal(tensor, final["state"][key][name]), (key, name)

    def rows(history):
        return [{k: v for k, v in row.items() if k not in NOT_COMPARED} for row in history]

    assert rows(final["history"]) == rows(reference["history"]) and len(final["history"]) == 2
    straight_metrics = read_metrics(next(run["logs"].glob("straight_*/*/metrics.csv")))
    assert next(run["logs"].glob("straight_*/*/curves.png")).read_bytes()[:4] == b"\x89PNG"  # two epochs: curves
    assert rows(read_metrics(run["continued_metrics"])) == rows(straight_metrics)
    if run["extended"] is not None:  # epochs=3: the same run (name) goes on from its last epoch
        assert run["extended"].returncode == 0, run["extended"].stderr
        assert "resumed at epoch 3/3 step 0" in run["extended"].stderr
        assert f"run: {run['folder'].name} " in run["extended"].stderr
        extended = torch.load(run["folder"] / "last.pt", weights_only=True)
        assert extended["epoch"] == 2 and rows(extended["history"][:2]) == rows(reference["history"])


# ---- in-process: a stop inside each phase of MAXL -------------------------------------------------------------

def maxl_fit(tmp_path, name, stop_at=None):
    """Build and fit a tiny MAXL job as maxl_train.py does; `stop_at` = (epoch, phase, step) sends SIGTERM there."""
    from dataset.hierarchical import load_hierarchical
    from engine.entry import compose
    from engine.session import Session
    from methods.maxl import MaxlJob
    from methods.scripts import SCRIPTS

    cfg = compose(SCRIPTS["maxl_train"], [*MAXL, "num_workers=0", "epochs=2", f"name={name}"])
    session = Session(cfg, tmp_path / "logs" / name, SCRIPTS["maxl_train"])
    job = MaxlJob(cfg, load_hierarchical(cfg.dataset), session)
    if stop_at is not None:
        phases = job.phases

        def phases_with_a_signal(epoch):
            wrapped = []
            for phase in phases(epoch):
                def step(batch, tracker, inner=phase.step, phase_name=phase.name):
                    inner(batch, tracker)
                    if (epoch, phase_name, tracker.step) == stop_at:
                        os.kill(os.getpid(), signal.SIGTERM)
                wrapped.append(type(phase)(phase.name, phase.loader, step))
            return wrapped

        job.phases = phases_with_a_signal
    try:
        return session.fit(job, 2), job
    finally:
        session.close()


@pytest.fixture(scope="module")
def straight_fit(tmp_path_factory):
    """The uninterrupted fit both stops are compared with: its summary and its final weights."""
    root = tmp_path_factory.mktemp("straight_fit")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORKSPACE", str(root / "workspace"))
        summary, job = maxl_fit(root, "straight")
    return summary, {module: getattr(job, module).state_dict() for module in ("model", "generator")}


@pytest.mark.parametrize("stop_at", [(0, "multi-task", 2), (1, "meta", 3)])
def test_a_stop_inside_either_maxl_phase_continues_exactly(stop_at, straight_fit, tmp_path, workspace):
    expected, reference = straight_fit
    with pytest.raises(RunInterrupted) as stopped:
        maxl_fit(tmp_path, "stopped", stop_at)
    assert stopped.value.exit_status == 128 + signal.SIGTERM
    assert f"at epoch {stop_at[0] + 1}/2 step {stop_at[2] + 1} ({stop_at[1]})" in str(stopped.value)
    payload = torch.load(workspace / "checkpoint" / "maxl" / "stopped" / "last.pt", weights_only=True)
    assert payload["position"]["phase_name"] == stop_at[1] and payload["position"]["step"] == stop_at[2] + 1
    summary, job = maxl_fit(tmp_path, "stopped")
    assert summary == expected
    for module, weights in reference.items():
        for key, value in weights.items():
            assert torch.equal(value, getattr(job, module).state_dict()[key]), (module, key)
