"""Nothing lost, nothing mixed (issue 20): a run's folders are its own whatever its name, a checkpoint is never
silently replaced, a refused input leaves every file of the workspace as it was."""
import pytest
from conftest import one_line_error, run_in_process

from engine.entry import compose
from engine.errors import UserError
from engine.runs import clear_run
from methods.scripts import SCRIPTS

RUN = ["method=single", "dataset=synthetic_hier", "dataset.generate.train_per_class=4", "batch_size=50",
       "device=cpu", "progress=false", "num_workers=0", "model.width_mult=0.0625", "epochs=1"]


def snapshot(*roots):
    """Every file and link under `roots`, with its bytes (a link: where it points)."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                found[path] = ("link", str(path.readlink()))
            elif path.is_file():
                found[path] = path.read_bytes()
            else:
                found[path] = "dir"
    return found


def other_runs(workspace):
    """A workspace holding runs of two scripts (their files need not be real checkpoints: nothing may read them)."""
    for folder in ("checkpoint/maxl/victim", "checkpoint/maxl/other", "checkpoint/label_learn/saves/mela"):
        (workspace / folder).mkdir(parents=True)
        for name in ("last.pt", "best.pt"):
            (workspace / folder / name).write_bytes(f"{folder}/{name}".encode())
    (workspace / "checkpoint" / "notes.txt").write_text("kept")


@pytest.mark.parametrize("bad", ["..", ".", "a/b", "/tmp/x", "a\\b"])
@pytest.mark.parametrize("key", ["name", "run_prefix"])
def test_a_run_name_is_one_folder_name(key, bad, workspace):
    with pytest.raises(UserError, match=f"{key}=.*: {key} must be a run name \\(one folder name"):
        compose(SCRIPTS["maxl_train"], [*RUN, f"{key}={bad}"])


@pytest.mark.parametrize("name", ["..", "."])
def test_overwrite_with_a_dot_name_deletes_nothing(name, tmp_path, workspace):
    other_runs(workspace)
    before = snapshot(workspace)
    result = run_in_process("maxl_train.py", *RUN, f"name={name}", "overwrite=true", cwd=tmp_path, workspace=workspace)
    assert f"name={name}: name must be a run name" in one_line_error(result)
    assert snapshot(workspace) == before


def test_clear_run_clears_only_a_folder_directly_inside_checkpoint_dir(tmp_path):
    root = tmp_path / "checkpoint"
    (root / "run").mkdir(parents=True)
    (root / "run" / "last.pt").write_bytes(b"x")
    (root / "elsewhere").symlink_to(tmp_path)
    (tmp_path / "outside.pt").write_bytes(b"y")
    for directory in (root, root / "..", root / "run" / "..", tmp_path, root / "elsewhere", root / "run" / "x"):
        with pytest.raises(UserError, match="not a run folder directly inside checkpoint_dir"):
            clear_run(directory, root)
    assert (root / "run" / "last.pt").exists() and (tmp_path / "outside.pt").exists()
    clear_run(root / "run", root)
    assert not (root / "run" / "last.pt").exists()


def cfg(**values):
    from omegaconf import OmegaConf

    return OmegaConf.create({"resume": "auto", "overwrite": False, "name": "run", **values})


@pytest.mark.parametrize("last", ["missing", "dangling", "folder"])
def test_a_run_without_a_readable_last_checkpoint_is_refused_not_started_again(last, tmp_path):
    from engine.runs import decide_resume

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "best.pt").write_bytes(b"best")
    if last == "dangling":
        (folder / "last.pt").symlink_to(tmp_path / "gone.pt")
    elif last == "folder":
        (folder / "last.pt").mkdir()
    for mode in ("auto", "true", "false"):
        with pytest.raises(UserError, match=r"holds files of an earlier run \(best\.pt.*overwrite=true"):
            decide_resume(cfg(resume=mode), folder)
    assert decide_resume(cfg(overwrite=True), folder) is False
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "lock.json").write_text("{}")
    assert decide_resume(cfg(), tmp_path / "fresh") is False  # only a lock: nothing to lose


def test_the_same_command_after_last_pt_was_deleted_keeps_best_pt(tmp_path, workspace):
    assert run_in_process("maxl_train.py", *RUN, "name=done", cwd=tmp_path, workspace=workspace).returncode == 0
    folder = workspace / "checkpoint" / "maxl" / "done"
    (folder / "last.pt").unlink()
    before = snapshot(workspace)
    result = run_in_process("maxl_train.py", *RUN, "name=done", cwd=tmp_path, workspace=workspace)
    assert "holds files of an earlier run (best.pt" in one_line_error(result)
    assert snapshot(workspace) == before


def test_a_lock_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path, caplog):
    import json
    import logging
    import os
    import socket
    import time

    from engine.runs import LOCK_FILE, RunLock, process_start

    live = os.getppid()
    assert process_start(live) is not None
    record = {"pid": live, "host": socket.gethostname(), "started": time.time()}
    (tmp_path / "reused").mkdir()
    (tmp_path / "reused" / LOCK_FILE).write_text(json.dumps({**record, "pid_started": process_start(live) - 1}))
    with caplog.at_level(logging.WARNING, logger="metalabel"):
        RunLock(tmp_path / "reused", 24).acquire()
    assert "its pid now belongs to another process" in caplog.text
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / LOCK_FILE).write_text(json.dumps({**record, "pid_started": process_start(live)}))
    with pytest.raises(UserError, match=f"in use by process {live} .*{LOCK_FILE}"):
        RunLock(tmp_path / "held", 24).acquire()
    with pytest.raises(UserError, match=f"in use by process {live}"):
        RunLock(tmp_path / "held", 24).check_free()
    assert json.loads((tmp_path / "held" / LOCK_FILE).read_text())["pid"] == live


def test_a_run_directory_holding_another_runs_records_is_refused(tmp_path, workspace):
    assert run_in_process("maxl_train.py", *RUN, "name=first", "hydra.run.dir=logs/fixed", cwd=tmp_path,
                      workspace=workspace).returncode == 0
    before = snapshot(workspace, tmp_path / "logs")
    result = run_in_process("maxl_train.py", *RUN, "name=second", "hydra.run.dir=logs/fixed", cwd=tmp_path,
                        workspace=workspace)
    assert "hydra.run.dir=logs/fixed holds the records of run first" in one_line_error(result)
    assert snapshot(workspace, tmp_path / "logs") == before
    again = run_in_process("maxl_train.py", *RUN, "name=first", "epochs=2", "hydra.run.dir=logs/fixed", cwd=tmp_path,
                       workspace=workspace)  # the same run continuing into its own directory
    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stderr + again.stdout


def test_a_refused_run_leaves_no_log_folder_and_a_same_second_start_gets_its_own(tmp_path, workspace, monkeypatch):
    monkeypatch.setenv("METALABEL_RUN_STAMP", "2026-01-01_00-00-00")  # every process: the same second
    assert run_in_process("maxl_train.py", *RUN, "name=live", cwd=tmp_path, workspace=workspace).returncode == 0
    folder = workspace / "checkpoint" / "maxl" / "live"
    import json
    import os
    import socket
    import time

    from engine.runs import LOCK_FILE, process_start

    live = os.getppid()  # a live process holds the run
    (folder / LOCK_FILE).write_text(json.dumps({"pid": live, "host": socket.gethostname(), "started": time.time(),
                                                "pid_started": process_start(live)}))
    before = snapshot(workspace, tmp_path / "logs")
    result = run_in_process("maxl_train.py", *RUN, "name=live", cwd=tmp_path, workspace=workspace)
    assert f"in use by process {live}" in one_line_error(result)
    assert snapshot(workspace, tmp_path / "logs") == before  # no log line in the live run's directory, no folder
    (folder / LOCK_FILE).unlink()
    second = run_in_process("maxl_train.py", *RUN, "name=live", "epochs=2", cwd=tmp_path, workspace=workspace)
    assert second.returncode == 0, second.stderr
    stamps = sorted(p.name for p in (tmp_path / "logs" / "maxl_train" / "live").iterdir())
    assert stamps == ["2026-01-01_00-00-00", "2026-01-01_00-00-00_2"]
    refused = run_in_process("maxl_train.py", *RUN, "name=live", "lr=0.5", cwd=tmp_path, workspace=workspace)
    assert "written with lr=0.01" in one_line_error(refused)  # a resume mismatch: its folder is removed
    assert sorted(p.name for p in (tmp_path / "logs" / "maxl_train" / "live").iterdir()) == stamps


def test_fewer_epochs_than_a_run_has_is_refused(tmp_path, workspace):
    assert run_in_process("maxl_train.py", *RUN, "name=long", "epochs=2", cwd=tmp_path, workspace=workspace).returncode == 0
    before = snapshot(workspace, tmp_path / "logs")
    result = run_in_process("maxl_train.py", *RUN, "name=long", "epochs=1", cwd=tmp_path, workspace=workspace)
    line = one_line_error(result)
    assert "run long already has 2 epochs" in line and "epochs=1 asks for fewer" in line and "name=" in line
    assert "overwrite=true" in line
    assert snapshot(workspace, tmp_path / "logs") == before


MELA = ["dataset=synthetic_fs", "model.width_mult=0.125", "device=cpu", "num_workers=0", "progress=false",
        "test_db_size=4", "epochs=1"]


def test_a_mela_step_does_not_continue_from_a_changed_upstream_checkpoint(tmp_path, workspace):
    def run(script, *overrides):
        return run_in_process(script, *MELA, *overrides, cwd=tmp_path, workspace=workspace)

    assert run("learn_meta_repr.py", "name=up", "n_shots=1", "n_queries=2").returncode == 0
    labeler = ["name=down", "pretrained_labeler=up", "K=20", "no_replacement=false", "train_db_size=20", "n_queries=5",
               "batch_size=25", "sup_rotate_aug=false"]
    assert run("learn_labeler.py", *labeler).returncode == 0
    folder = workspace / "checkpoint" / "label_learn" / "saves" / "down"
    import torch

    from engine.checkpoint import file_identity

    recorded = torch.load(folder / "last.pt", weights_only=True)["inputs"]
    assert recorded == {"pretrained_labeler": file_identity(folder.parent / "up" / "best.pt")}
    # replaced (an extension replaces best.pt only when validation improves: a new seed always does)
    assert run("learn_meta_repr.py", "name=up", "n_shots=1", "n_queries=2", "seed=1", "overwrite=true").returncode == 0
    before = snapshot(workspace)
    result = run("learn_labeler.py", *labeler, "epochs=2")
    assert "started from another pretrained_labeler checkpoint" in one_line_error(result)
    assert snapshot(workspace) == before


@pytest.mark.parametrize("key, value", [("checkpoint_dir", "{file}/sub"), ("checkpoint_dir", "/proc/metalabel"),
                                        ("workspace", "{file}"), ("workspace", "/proc/metalabel")])
def test_a_directory_under_a_file_or_proc_is_one_line(key, value, tmp_path, workspace):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=f"{key}=.*(is a file|is inside .*file|not writable)"):
        compose(SCRIPTS["maxl_train"], [*RUN, f"{key}={value.format(file=tmp_path / 'file')}"])


def test_hydra_run_dir_under_a_file_is_one_line(tmp_path, workspace):
    (tmp_path / "file").write_text("x")
    result = run_in_process("maxl_train.py", *RUN, f"hydra.run.dir={tmp_path / 'file' / 'run'}", cwd=tmp_path,
                        workspace=workspace)
    assert "hydra.run.dir=" in one_line_error(result)


def test_damaged_checkpoints_of_a_finished_run_are_one_line_with_a_fix(tmp_path, workspace):
    import shutil

    import torch

    assert run_in_process("maxl_train.py", *RUN, "name=done", cwd=tmp_path, workspace=workspace).returncode == 0
    folder = workspace / "checkpoint" / "maxl" / "done"
    shutil.copy(folder / "last.pt", tmp_path / "last.pt")
    good = torch.load(folder / "last.pt", weights_only=True)

    def damaged(change, expected, file="last.pt"):
        payload = {**good, "state": dict(good["state"])}
        change(payload)
        torch.save(payload, folder / file) if file == "last.pt" else (folder / file).write_bytes(b"garbage")
        before = snapshot(workspace)
        line = one_line_error(run_in_process("maxl_train.py", *RUN, "name=done", cwd=tmp_path, workspace=workspace))
        assert expected in line and "overwrite=true" in line, line
        assert snapshot(workspace) == before
        shutil.copy(tmp_path / "last.pt", folder / "last.pt")

    def misfit(payload):
        key = next(k for k, v in payload["state"]["model"].items() if v.dim() == 4)
        payload["state"]["model"] = {**payload["state"]["model"], key: torch.zeros(1, 1, 1, 1)}

    damaged(misfit, "its 'model' state does not fit")
    damaged(lambda p: p["state"].pop("optimizer"), "has no 'optimizer' state")
    damaged(lambda p: p.pop("script"), "a script it does not name")
    shutil.copy(folder / "best.pt", tmp_path / "best.pt")
    damaged(lambda p: None, "best.pt", file="best.pt")
