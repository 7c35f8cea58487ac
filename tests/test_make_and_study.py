"""The Makefile's logic that needs no training: the torch spec a .venv was made with is kept (.venv/.torch_spec),
the demos continue instead of retraining, and the study recipes hand their variables to tools/study.py through
the environment, so nothing a user writes in ARGS moves the study's outputs."""
import os
import shutil
import subprocess

import pytest
from conftest import ROOT, run_in_process

from tools import study

DEFAULT_SPEC = "torch==2.14.1 torchvision==0.29.1"
CU118 = "torch==2.6.0 torchvision==0.21.0 --index-url https://download.pytorch.org/whl/cu118"


def dry_run(folder, *args, env=None):
    """`make -n` in `folder`: the commands make would run."""
    environment = {k: v for k, v in os.environ.items() if k != "TORCH_SPEC"} | (env or {})
    return subprocess.run(["make", "-n", *args], cwd=folder, capture_output=True, text=True, env=environment,
                          check=True).stdout


@pytest.fixture
def venv_copy(tmp_path):
    """The Makefile and pyproject.toml in a folder with a .venv whose .installed is older than pyproject.toml."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".venv").mkdir()
    installed = tmp_path / ".venv" / ".installed"
    installed.touch()
    os.utime(installed, (1, 1))
    return tmp_path


def test_a_changed_pyproject_reinstalls_with_the_spec_the_venv_was_made_with(venv_copy):
    (venv_copy / ".venv" / ".torch_spec").write_text(CU118 + "\n")
    commands = dry_run(venv_copy, "setup")
    assert f"pip install -q {CU118}" in commands and DEFAULT_SPEC not in commands
    assert f"echo '{CU118}' > .venv/.torch_spec" in commands


def test_without_a_recorded_spec_the_default_and_an_explicit_spec_wins(venv_copy):
    assert f"pip install -q {DEFAULT_SPEC}" in dry_run(venv_copy, "setup")
    (venv_copy / ".venv" / ".torch_spec").write_text(CU118 + "\n")
    assert f"pip install -q {DEFAULT_SPEC}" in dry_run(venv_copy, "setup", f"TORCH_SPEC={DEFAULT_SPEC}")
    assert f"pip install -q {DEFAULT_SPEC}" in dry_run(venv_copy, "setup", env={"TORCH_SPEC": DEFAULT_SPEC})


def test_an_up_to_date_venv_is_left_alone_unless_another_spec_is_given(venv_copy):
    (venv_copy / ".venv" / ".torch_spec").write_text(CU118 + "\n")
    os.utime(venv_copy / ".venv" / ".installed", None)  # newer than pyproject.toml
    assert "pip install" not in dry_run(venv_copy, "setup")
    assert "pip install" not in dry_run(venv_copy, "setup", f"TORCH_SPEC={CU118}")
    assert f"pip install -q {DEFAULT_SPEC}" in dry_run(venv_copy, "setup", f"TORCH_SPEC={DEFAULT_SPEC}")


def make_variable(name: str) -> str:
    return subprocess.run(["make", "-s", "--no-print-directory", "--eval", f"print-var: ; @echo $({name})",
                           "print-var"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_the_demos_continue_finished_runs_instead_of_training_them_again(tmp_path):
    """`make demo` twice: the MAXL demo's runs (a fixed hydra.run.dir) resume after their last epoch and train
    nothing; the MeLa demo's pipeline skips its finished steps (tests/test_presets.py), since neither recipe gives
    overwrite=true."""
    commands = dry_run(ROOT, "-o", ".venv/.installed", "demo")
    assert "overwrite" not in commands and "tools.pipeline --dataset digits --name demo" in commands
    demo = [a for a in make_variable("DEMO_MAXL").split() if not a.startswith(("epochs=", "model.width_mult="))]
    args = ["method=single", *demo, "epochs=1", "model.width_mult=0.125", "threads=1",
            "hydra.run.dir=logs/demo/maxl/single"]
    first = run_in_process("maxl_train.py", *args, cwd=tmp_path, workspace=tmp_path / "workspace")
    assert first.returncode == 0, first.stderr
    again = run_in_process("maxl_train.py", *args, cwd=tmp_path, workspace=tmp_path / "workspace")
    assert again.returncode == 0, again.stderr
    assert "resumed after epoch 1, the last of 1" in again.stdout + again.stderr
    assert "epoch 1/1" not in again.stdout + again.stderr  # nothing trained
    rows = (tmp_path / "logs" / "demo" / "maxl" / "single" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2  # the header and epoch 0, once


# ---- the studies' variables --------------------------------------------------------------------------------

def test_the_study_recipes_never_splice_their_variables_into_shell_text():
    text = (ROOT / "Makefile").read_text()
    for target in ("$(MAXL_STUDIES) mela_study:", "pipeline:"):
        recipe = text.split(f"\n{target}", 1)[1].split("\n\n", 1)[0]
        assert "$(ARGS)" not in recipe and "tools.study" in recipe
    odd = "epochs=1\n   seed=0 'a b'"
    assert "epochs=1" not in dry_run(ROOT, "-o", ".venv/.installed", "maxl_psi", f"ARGS={odd}")


@pytest.fixture
def launched(monkeypatch):
    """tools.study's commands, recorded instead of run."""
    calls = []
    monkeypatch.setattr(study, "run", lambda *command: calls.append(command) or 0)
    for variable in ("ARGS", "SEEDS", "STUDY_DIR", "NAME", "DATASET", "DATASETS", "MODELS"):
        monkeypatch.delenv(variable, raising=False)
    return calls


def test_args_over_lines_and_with_quotes_split_like_a_shell_and_outputs_stay_in_the_study(launched, monkeypatch):
    monkeypatch.setenv("ARGS", "experiment/psi=single,psi2 epochs=1\n   batch_size=100 'name=a b'")
    monkeypatch.setenv("STUDY_DIR", "logs/s")
    monkeypatch.setenv("SEEDS", "0")
    assert study.main(["maxl_psi"]) == 0
    sweep, report = launched
    assert sweep[-4:] == ("experiment/psi=single,psi2", "epochs=1", "batch_size=100", "name=a b")
    assert "hydra.sweep.dir=logs/s" in sweep and "seed=0" in sweep
    outputs = [report[i + 1] for i, a in enumerate(report) if a in ("--csv", "--json", "--plot")]
    assert outputs == ["logs/s/table.csv", "logs/s/table.json", "logs/s/test_accuracy.png"]


def test_a_blank_study_dir_takes_the_default_folder_and_the_top_is_refused(launched, monkeypatch, capsys):
    monkeypatch.setenv("STUDY_DIR", "  \n")
    assert study.main(["maxl_hierarchies"]) == 0
    assert launched[0][3].startswith("hydra.sweep.dir=logs/studies/maxl_hierarchies/")
    monkeypatch.setenv("STUDY_DIR", "/")
    assert study.main(["maxl_psi"]) == 1
    assert capsys.readouterr().err.startswith("error: STUDY_DIR=/: a study's folder cannot be the top")
    monkeypatch.setenv("STUDY_DIR", "x")
    monkeypatch.setenv("ARGS", "epochs='1")
    assert study.main(["maxl_psi"]) == 1
    assert capsys.readouterr().err.startswith("error: ARGS=\"epochs='1\": No closing quotation")


def test_pipeline_defaults_to_synthetic_fs_and_mela_study_to_the_papers_grid(launched, monkeypatch):
    assert study.main(["pipeline"]) == 0
    assert launched[-1][:4] == ("-m", "tools.pipeline", "--dataset", "synthetic_fs")
    monkeypatch.setenv("NAME", "n")
    assert study.main(["mela_study"]) == 0
    chain = launched[-3]
    assert " ".join(chain).startswith("-m tools.pipeline --name n --out logs/pipeline/n --dataset miniImageNet "
                                      "tieredImageNet --model resnet12 resnet18 --seed 0 1 2 --")
