"""Run identity: names derived from the settings that change a result; resume/overwrite decisions; the run lock."""
import json
import logging
import os
import socket
import time

import pytest

from engine.config import settings_hash
from engine.entry import compose
from engine.errors import UserError
from engine.runs import LOCK_FILE, RunLock, clear_run, decide_resume, remove_interrupted_writes
from engine.settings import neutral_keys
from methods.scripts import SCRIPTS as ALL

SCRIPTS = {"maxl_train": ["dataset=synthetic_hier"], "learn_meta_repr": ["dataset=synthetic_fs"],
           "learn_labeler": ["dataset=synthetic_fs"], "fine_tune": ["dataset=synthetic_fs"],
           "meta_eval": ["dataset=synthetic_fs"], "sup_baseline": ["dataset=synthetic_fs"]}
LR_KEY = {"maxl_train": "lr"}


def name(script, *overrides):
    return compose(ALL[script], [*SCRIPTS[script], *overrides]).name


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_seed_and_hyper_parameters_change_the_name_and_epochs_does_not(script, workspace):
    base = name(script)
    assert base.endswith("_s0") and name(script, "seed=1").endswith("_s1")
    assert name(script, "seed=1") != base
    lr = LR_KEY.get(script, "learning_rate")
    if script != "meta_eval":
        low, high = name(script, f"{lr}=0.01"), name(script, f"{lr}=0.1")
        assert low != high and len({low, high, base}) >= 2
        assert name(script, "epochs=7") == base
        assert name(script, "batch_size=10" if script in ("maxl_train", "learn_labeler", "sup_baseline")
                    else "n_ways=3") != base
    assert name(script, "model.width_mult=0.5") != base
    for resumable in ("device=cpu", "num_workers=0", "progress=false", "checkpoint_every=5", "threads=1"):
        assert name(script, resumable) == base, resumable
    assert name(script, "name=mine") == "mine"


def test_a_default_given_explicitly_is_no_change(workspace):
    base = name("maxl_train")
    assert name("maxl_train", "lr=0.01", "batch_size=100") == base  # the defaults, spelled out
    assert name("maxl_train", "lr=0.02").startswith("maxl_synthetic_hier_20-100_vgg16_w1.0_s0_")
    assert len(name("maxl_train", "lr=0.02").rsplit("_", 1)[1]) == 8


def test_the_hash_is_stable_and_depends_only_on_the_changes():
    defaults = {"a": 1, "b": [1, 2], "c": "x"}
    assert settings_hash(defaults, defaults) == ""
    changed = settings_hash({**defaults, "a": 2}, defaults)
    assert changed == settings_hash({"c": "x", "b": [1, 2], "a": 2}, defaults) and len(changed) == 8
    assert changed != settings_hash({**defaults, "b": [2, 1]}, defaults)


# The settings runs were always named without: a change here renames existing runs.
NEUTRAL = {"resume", "overwrite", "epochs", "progress", "device", "num_workers", "workspace", "data_dir",
           "checkpoint_dir", "compile", "threads", "checkpoint_every", "lock_stale_hours", "data_device",
           "data_device_memory_share"}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_the_neutral_settings_are_those_run_names_always_left_out(script):
    assert neutral_keys(ALL[script].settings) == (NEUTRAL - {"epochs"} if script == "meta_eval" else NEUTRAL)


@pytest.mark.parametrize("script, overrides, expected", [  # names derived before the settings moved to the code
    ("maxl_train", ["lr=0.02"], "maxl_cifar100_20-100_vgg16_w1.0_s0_a36fb820"),
    ("maxl_train", ["method=single", "seed=3"], "single_cifar100_20-100_vgg16_w1.0_s3_14d22404"),
    ("learn_meta_repr", ["seed=2", "n_ways=4"],
     "resnet12_mixed_nways4_nshots5_data-aug_no-replace_5_meta_repr_s2_8e44475f"),
    ("learn_labeler", ["K=30", "n_ways=3", "pretrained_labeler=x"],
     "labeler_resnet12_mixed_nways3_nshots5_no-replace_q3.5_3_s0_9dc39173"),
    ("meta_eval", ["pretrained_model=abc", "n_ways=3"], "meta_eval_resnet12_mixed_nways3_1_s0_45351525"),
    ("sup_baseline", ["val_n_shots=[1,5]", "test_db_size=10"],
     "resnet12_mixed_nways5_data-aug_rot-aug_5_sup_base_s0_a4776d1b"),
    ("fine_tune", ["model.width_mult=0.5", "dataset=digits"],
     "resnet12_digits_nways5_nshots5_data-aug_no-replace_2_fine_tune_s0_30aa955a"),
])
def test_derived_names_are_unchanged(script, overrides, expected, workspace):
    assert compose(ALL[script], overrides).name == expected


def cfg_for(tmp_path, **values):
    from omegaconf import OmegaConf

    return OmegaConf.create({"resume": "auto", "overwrite": False, "name": "run", **values})


def test_resume_auto_true_false_and_overwrite(tmp_path):
    folder = tmp_path / "run"
    assert decide_resume(cfg_for(tmp_path), folder) is False  # nothing yet: start
    with pytest.raises(UserError, match="resume=true but run run has no checkpoint"):
        decide_resume(cfg_for(tmp_path, resume="true"), folder)
    folder.mkdir()
    (folder / "last.pt").write_bytes(b"x")
    assert decide_resume(cfg_for(tmp_path), folder) is True
    assert decide_resume(cfg_for(tmp_path, resume="true"), folder) is True
    with pytest.raises(UserError, match="exists from an earlier run and resume=false"):
        decide_resume(cfg_for(tmp_path, resume="false"), folder)
    assert decide_resume(cfg_for(tmp_path, resume="false", overwrite=True), folder) is False
    for extra in ("best.pt", "best_1shot.pt", "centroids.pt", LOCK_FILE):
        (folder / extra).write_bytes(b"x")
    clear_run(folder, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]


def write_lock(folder, pid, host, age_hours=0.0):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host, "started": time.time() - age_hours * 3600}))


def test_a_live_lock_is_an_error_and_a_stale_one_is_taken_over(tmp_path, caplog):
    here = socket.gethostname()
    live = os.getppid()  # alive, and not this process
    write_lock(tmp_path / "a", live, here)
    with pytest.raises(UserError, match=f"in use by process {live} on this host"):
        RunLock(tmp_path / "a", 24).acquire()
    write_lock(tmp_path / "b", 2**22 + 11, here)  # no such process
    with caplog.at_level(logging.WARNING, logger="metalabel"):
        lock = RunLock(tmp_path / "b", 24)
        lock.acquire()
    assert "no longer running" in caplog.text
    assert json.loads((tmp_path / "b" / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "b").exists()  # nothing else was written: no folder is left
    write_lock(tmp_path / "c", 1, "another-host", age_hours=1)
    with pytest.raises(UserError, match="locked by process 1 on host another-host"):
        RunLock(tmp_path / "c", 24).acquire()
    write_lock(tmp_path / "d", 1, "another-host", age_hours=30)
    RunLock(tmp_path / "d", 24).acquire()
    assert json.loads((tmp_path / "d" / LOCK_FILE).read_text())["host"] == here


def test_leftovers_of_killed_writes_are_removed_and_live_ones_kept(tmp_path):
    dead, live = tmp_path / f".last.pt.tmp{2**22 + 13}", tmp_path / f".best.pt.tmp{os.getppid()}"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    remove_interrupted_writes(tmp_path)
    assert not dead.exists() and live.exists()


def test_threads_auto_shares_the_usable_cores_between_the_processes_of_a_node(monkeypatch):
    from engine.session import resolve_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads("auto", 4) == 3  # what the launcher (or the user) asked for
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert resolve_threads("auto", 1) == 16 and resolve_threads("auto", 4) == 4 and resolve_threads("auto", 32) == 1
    assert resolve_threads(3, 4) == 3


def test_data_dir_spelled_out_or_elsewhere_keeps_the_name(workspace, tmp_path):
    base = name("maxl_train")
    assert name("maxl_train", f"data_dir={workspace}/metaL_data") == base  # the default, spelled out
    assert name("maxl_train", f"data_dir={tmp_path}/elsewhere") == base
    assert name("learn_meta_repr", f"data_dir={tmp_path}/elsewhere") == name("learn_meta_repr")
