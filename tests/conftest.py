import importlib
import os
import subprocess
import sys
import threading
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


class Forked:
    """`target()` in a process forked from this one: a real process (its own pid, signals, exit status) that starts
    with torch and the project already imported, so without the seconds a new interpreter spends importing them.
    `stdout` streams its output (stdout and stderr together); `poll`, `wait` and `send_signal` as `subprocess.Popen`.
    `target` returns the exit status or raises SystemExit; an exception's traceback goes to the output, status 1."""

    def __init__(self, target, *, env: dict | None = None, cwd: Path | None = None):
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            status = 1
            try:
                os.close(read)
                os.dup2(write, 1)
                os.dup2(write, 2)
                sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
                os.environ.update(env or {})
                if cwd is not None:
                    os.chdir(cwd)
                try:
                    status = target() or 0
                except SystemExit as exit_:
                    status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(status)
        os.close(write)
        self.stdout = os.fdopen(read, "r")
        self.returncode = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                os.kill(self.pid, 9)
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.02)
        return self.returncode

    def communicate(self, timeout: float = 300) -> tuple[int, str]:
        """Its whole output and its exit status, once it has ended."""
        output = self.stdout.read()
        self.stdout.close()
        return self.wait(timeout), output


def script_main(script: str, *overrides: str):
    """A target for `Forked`: the top-level script with these command-line arguments, as `python SCRIPT ...` runs."""
    def run():
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        sys.argv = [str(ROOT / script), *overrides]
        importlib.import_module(Path(script).stem).main()
    return run


def run_ranks(target, *, ranks: int = 2, port: int, cwd: Path, env: dict | None = None):
    """`target` on `ranks` forked processes with the variables torchrun gives each rank (RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT): the ranks' results without torchrun's process and
    each rank's imports. For tests whose point is what the ranks compute; torchrun itself is run where it is the
    point (signals passed on to the ranks, the benches). The highest exit status; stdout rank 0's output, stderr
    every rank's."""
    processes = [Forked(target, cwd=cwd, env={**(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
                                              "WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks),
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                              "OMP_NUM_THREADS": "1"})
                 for rank in range(ranks)]
    outputs = [None] * ranks
    readers = [threading.Thread(target=lambda r=r: outputs.__setitem__(r, processes[r].communicate()))
               for r in range(ranks)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
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
