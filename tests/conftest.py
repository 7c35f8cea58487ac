import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A fresh $WORKSPACE for the test (also for code run in this process)."""
    path = tmp_path / "workspace"
    path.mkdir()
    monkeypatch.setenv("WORKSPACE", str(path))
    return path


def run_script(script: str, *overrides: str, cwd: Path, workspace: Path, timeout: int = 300):
    """Run a top-level script as a user would; logs go under `cwd`/logs."""
    env = dict(os.environ, WORKSPACE=str(workspace), PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(script: str, *overrides: str, cwd: Path, workspace: Path):
    """Run a top-level script in this process, as `run_script` would in a new one (same arguments, folder and
    $WORKSPACE; the same exit status, stdout and stderr, a traceback in stderr for an uncaught exception), without
    the seconds a new process spends importing torch. For tests where a separate process adds nothing."""
    import contextlib
    import importlib
    import io
    import logging
    import traceback

    import torch
    from hydra.core.global_hydra import GlobalHydra

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    script = Path(script).name  # a name, or the script's path
    main = importlib.import_module(script.removesuffix(".py")).main
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = (sys.argv, os.getcwd(), os.environ.get("WORKSPACE"), torch.get_num_threads())
    sys.argv = [str(ROOT / script), *overrides]
    os.environ["WORKSPACE"] = str(workspace)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except Exception:
                err.write(traceback.format_exc())
                code = 1
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        if saved[2] is None:
            os.environ.pop("WORKSPACE", None)
        else:
            os.environ["WORKSPACE"] = saved[2]
        torch.set_num_threads(saved[3])
        GlobalHydra.instance().clear()
        for handler in logging.getLogger().handlers[:]:  # Hydra's handlers write to the closed buffers
            logging.getLogger().removeHandler(handler)
    return subprocess.CompletedProcess([script, *overrides], code, out.getvalue(), err.getvalue())


def launch_in_process(command, cwd=None, **_):
    """`subprocess.run` for tools.study and tools.pipeline: their launches (`python SCRIPT.py ...`, `python -m
    tools.X ...`) run in this process, as `run_in_process` runs a script, their output passed on to this process's
    stdout/stderr."""
    import importlib

    if command[1] == "-m":
        module, args = importlib.import_module(command[2]), command[3:]
        try:
            code = module.main(args) or 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        return subprocess.CompletedProcess(command, code)
    done = run_in_process(command[1], *command[2:], cwd=Path(cwd or os.getcwd()),
                          workspace=Path(os.environ["WORKSPACE"]))
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done


def launch_studies_in_process(setattr_) -> None:
    """Give tools.study and tools.pipeline `launch_in_process` for their `subprocess.run`."""
    import types

    import tools.pipeline
    import tools.study

    for module in (tools.pipeline, tools.study):
        setattr_(module, "subprocess", types.SimpleNamespace(run=launch_in_process))


@pytest.fixture
def studies_in_process(monkeypatch):
    """A study's steps run in the test's process, without the seconds each new process spends importing torch: for
    tests of what a study computes. The `make` layer in front of it is run by the documentation's blocks."""
    launch_studies_in_process(monkeypatch.setattr)


def one_line_error(result) -> str:
    """The error line of a failed run; asserts a clean failure (exit 1, no traceback)."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# Files whose tests start many processes, longest first: handed out first, so that `pytest -n 2 --dist loadfile`
# spreads them over both workers and the short files fill in around them.
LONG_FILES = ("test_preemption.py", "test_distributed.py", "test_presets.py", "test_mela_scripts.py",
              "test_gpu_check.py", "test_bench.py", "test_maxl_train.py", "test_validation.py", "test_own_data_scripts.py",
              "test_cifar_fewshot.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: each file keeps its own order
