"""A training run's checkpoint folder: whether to continue or start (`resume`, `overwrite`), the lock that keeps a
second live process off the same run, and the clean-up of an interrupted write."""
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from engine.errors import UserError

log = logging.getLogger("metalabel")

LOCK_FILE = "lock.json"
LAST = "last.pt"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunLock:
    """`lock.json` (pid, host, start time) in the run's checkpoint folder, created atomically. A lock of a live
    process is an error; a stale one (dead pid on this host, or older than `stale_hours` from another host) is taken
    over with a warning."""

    def __init__(self, directory: Path, stale_hours: float):
        self.path = Path(directory) / LOCK_FILE
        self.stale_hours = float(stale_hours)
        self.mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                with open(self.path, "x") as handle:
                    json.dump(self.mine, handle)
                self.held = True
                return
            except FileExistsError:
                self._take_over_if_stale()
        raise UserError(f"{self.path} could not be taken: another process took the run at the same time")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host, started = int(holder["pid"]), str(holder["host"]), float(holder["started"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning(f"{self.path} is unreadable: taking the run over")
            self.path.unlink(missing_ok=True)
            return
        age_hours = (time.time() - started) / 3600
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        if host == self.mine["host"]:
            if _pid_alive(pid) and pid != os.getpid():
                raise UserError(f"run {self.path.parent.name} is in use by process {pid} on this host since {since}: "
                                f"wait for it to finish, stop it, or start another run with name=...")
            log.warning(f"taking over the run's lock from process {pid} (no longer running) of {since}")
        elif age_hours < self.stale_hours:
            raise UserError(f"run {self.path.parent.name} is locked by process {pid} on host {host} since {since}: "
                            f"wait for it, or if that job is dead delete {self.path} (locks from another host are "
                            f"taken over after lock_stale_hours={self.stale_hours:g})")
        else:
            log.warning(f"taking over the run's lock from process {pid} on {host}, {age_hours:.1f} h old "
                        f"(lock_stale_hours={self.stale_hours:g})")
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        try:
            if json.loads(self.path.read_text()).get("pid") == self.mine["pid"]:
                self.path.unlink()
            if not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()  # a run refused before it wrote anything leaves no folder
        except (OSError, ValueError):
            pass
        self.held = False


def remove_interrupted_writes(directory: Path) -> None:
    """Temporary files of checkpoint writes that a killed process left behind (`.NAME.tmpPID`)."""
    for tmp in Path(directory).glob(".*.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if not pid.isdigit() or not _pid_alive(int(pid)) or int(pid) == os.getpid():
            tmp.unlink(missing_ok=True)


def decide_resume(cfg, directory: Path) -> bool:
    """True when the run continues from `last.pt`. resume=auto continues when the run has one; resume=true requires
    one; resume=false refuses an existing run unless overwrite=true, which removes all of its files first."""
    mode = str(cfg.resume).lower()
    last = Path(directory) / LAST
    if cfg.overwrite:  # (with resume=true: refused by EngineSettings' relation)
        return False
    if mode == "true" and not last.is_file():
        raise UserError(f"resume=true but run {cfg.name} has no checkpoint {last}: start it without resume=true, "
                        f"or give the name of an earlier run")
    if mode == "false" and last.is_file():
        raise UserError(f"{last} exists from an earlier run and resume=false: resume=auto continues it, "
                        f"overwrite=true starts again and replaces it, name=... starts a separate run")
    return last.is_file()


def clear_run(directory: Path) -> None:
    """overwrite=true: every file of the run's checkpoint folder (last, every best, centroids...) but the lock."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    removed = []
    for entry in directory.iterdir():
        if entry.name == LOCK_FILE:
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        removed.append(entry.name)
    if removed:
        log.info(f"overwrite=true: removed {', '.join(sorted(removed))} from {directory}")
