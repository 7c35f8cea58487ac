import importlib
import multiprocessing
import os
import subprocess
import sys
import time
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
    import io
    import logging
    import traceback
    import unittest.mock

    import torch
    from hydra._internal.hydra import Hydra
    from hydra.core.global_hydra import GlobalHydra

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    script = Path(script).name  # a name, or the script's path
    main = importlib.import_module(script.removesuffix(".py")).main
    out, err, code = io.StringIO(), io.StringIO(), 0
    hydra_get_mode = Hydra.get_mode

    def mode_from_the_command_line(hydra, config_name, overrides):
        # Hydra composes a run's whole config twice, the first time only to read `hydra.mode`, which no config here
        # sets: None, and the command line's -m decides. The same answer without that composition.
        if any(override.lstrip("+~").startswith("hydra.mode") for override in overrides):
            return hydra_get_mode(hydra, config_name, overrides)
        return None

    saved = (sys.argv, os.getcwd(), os.environ.get("WORKSPACE"), torch.get_num_threads())
    sys.argv = [str(ROOT / script), *overrides]
    os.environ["WORKSPACE"] = str(workspace)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                unittest.mock.patch.object(Hydra, "get_mode", mode_from_the_command_line):
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


# What a forked process would otherwise import itself (most of a script's start-up)
PRELOAD = ("torch", "torch._dynamo", "torch.func", "torch.utils.tensorboard", "hydra", "sklearn.metrics",
           "sklearn.linear_model", "engine.entry", "dataset.hierarchical", "methods.scripts", "methods.maxl",
           "methods.mela_jobs", "methods.label_inference")


def _forked(target, args: tuple, env: dict, cwd: Path | None, output: Path) -> None:
    """In the forked process: its output into `output`, then `target(*args)`; its return value the exit status."""
    handle = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    sys.stdout = sys.stderr = open(handle, "w", buffering=1, closefd=False)
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    sys.exit(target(*args) or 0)


class Forked:
    """`target(*args)` in a real process (its own pid, signals, exit status) forked from one that has imported torch
    and the project (this one, or a fork server), so without the seconds a new interpreter spends importing them.
    `stdout` yields its output (stdout and stderr together) line by line as it is written; `poll`, `wait` and
    `send_signal` as `subprocess.Popen`. An exception's traceback goes to the output, exit status 1."""

    context = None

    def __init__(self, target, *args, env: dict | None = None, cwd: Path | None = None, output: Path):
        if Forked.context is None:
            # A process that has run OpenMP on several threads cannot be forked safely (the child hangs in libgomp):
            # with one thread for the whole session (make test) fork this process, else a server that has imported
            # PRELOAD and computed nothing.
            one_thread = os.environ.get("OMP_NUM_THREADS") == "1"
            Forked.context = multiprocessing.get_context("fork" if one_thread else "forkserver")
            if not one_thread:
                Forked.context.set_forkserver_preload(list(PRELOAD))
        self.output = output
        self.process = Forked.context.Process(target=_forked, args=(target, args, env or {}, cwd, output))
        self.process.start()

    @property
    def stdout(self):
        """Its output's lines, as they come, until it has ended."""
        while not self.output.exists() and self.poll() is None:
            time.sleep(0.02)
        with open(self.output) as stream:
            pending = ""
            while True:
                ended = self.poll() is not None  # before reading: nothing written after it is missed
                pending += stream.read()
                *lines, pending = pending.split("\n")
                yield from (line + "\n" for line in lines)
                if ended:
                    if pending:
                        yield pending
                    return
                time.sleep(0.02)

    def poll(self) -> int | None:
        return self.process.exitcode

    def send_signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def wait(self, timeout: float = 300) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            raise subprocess.TimeoutExpired(str(self.process.pid), timeout)
        return self.process.exitcode

    def communicate(self, timeout: float = 300) -> tuple[int, str]:
        """Its exit status and its whole output, once it has ended."""
        status = self.wait(timeout)
        return status, self.output.read_text() if self.output.exists() else ""


def run_script_main(script: str, *overrides: str) -> None:
    """A target for `Forked`: the top-level script with these command-line arguments, as `python SCRIPT ...` runs."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.argv = [str(ROOT / script), *overrides]
    importlib.import_module(Path(script).stem).main()


def run_ranks(target, *args, ranks: int = 2, port: int, cwd: Path, env: dict | None = None):
    """`target(*args)` on `ranks` forked processes (`Forked`) with the variables torchrun gives each rank (RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT): the ranks' results without torchrun's
    process and each rank's imports. For tests whose point is what the ranks compute; torchrun itself is run where
    it is the point (signals passed on to the ranks, the benches). The highest exit status; stdout rank 0's output,
    stderr every rank's."""
    processes = [Forked(target, *args, cwd=cwd, output=cwd / f".rank{rank}_{port}.out",
                        env={**(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                             "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                             "OMP_NUM_THREADS": "1"})
                 for rank in range(ranks)]
    outputs = [process.communicate() for process in processes]
    return subprocess.CompletedProcess(["ranks", str(ranks)], max(status for status, _ in outputs), outputs[0][1],
                                       "".join(f"[rank {r}]\n{out}" for r, (_, out) in enumerate(outputs)))


def launch_in_process(command, cwd=None, **_):
    """`subprocess.run` for tools.study and tools.pipeline: their launches (`python SCRIPT.py ...`, `python -m
    tools.X ...`) run in this process, as `run_in_process` runs a script, their output passed on to this process's
    stdout/stderr."""
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


# The longest files (CPU seconds, measured), longest first: handed out first, so that `pytest -n 2 --dist loadfile`
# spreads them over both workers and the short files fill in around them at the end.
LONG_FILES = ("test_presets.py", "test_distributed.py", "test_preemption.py", "test_bench.py", "test_cifar_fewshot.py",
              "test_gpu_check.py", "test_maxl_toy.py", "test_docs_commands.py", "test_validation.py",
              "test_run_folders.py", "test_run_identity.py", "test_mela_learning.py", "test_make_and_study.py",
              "test_mela_scripts.py", "test_maxl_train.py", "test_command_line.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # xdist would hand out the files with the most tests first instead


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: each file keeps its own order
