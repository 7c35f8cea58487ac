"""A training run's checkpoint folder: whether to continue or start (`resume`, `overwrite`), the lock that keeps a
second live process off the same run, and the clean-up of an interrupted write."""
import contextlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from engine.errors import UserError
from engine.settings import is_folder_name

log = logging.getLogger("metalabel")

LOCK_FILE = "lock.json"
LAST = "last.pt"
SHOWN = 4  # file names quoted in a message


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat), None where that cannot be read: with
    the pid it tells a process from a later one that was given the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name may hold spaces
    except (OSError, ValueError, IndexError):
        return None


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
        self.mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                     "pid_started": process_start(os.getpid())}
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

    def check_free(self) -> None:
        """A UserError when a live process holds the run (nothing is written or taken)."""
        if self.path.exists():
            self._take_over_if_stale(take=False)

    def _take_over_if_stale(self, take: bool = True) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host, started = int(holder["pid"]), str(holder["host"]), float(holder["started"])
        except (OSError, ValueError, KeyError, TypeError):
            if take:
                log.warning(f"{self.path} is unreadable: taking the run over")
                self.path.unlink(missing_ok=True)
            return
        age_hours = (time.time() - started) / 3600
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        if host == self.mine["host"]:
            recorded, now = holder.get("pid_started"), process_start(pid)
            same_process = _pid_alive(pid) and (recorded is None or now is None or int(recorded) == now)
            if same_process and pid != os.getpid():
                raise UserError(f"run {self.path.parent.name} is in use by process {pid} on this host since {since} "
                                f"({self.path}): wait for it to finish, stop it, or start another run with name=...")
            if not take:
                return
            reason = "no longer running" if not _pid_alive(pid) else "its pid now belongs to another process"
            log.warning(f"taking over the run's lock {self.path} from process {pid} ({reason}) of {since}")
        elif age_hours < self.stale_hours:
            raise UserError(f"run {self.path.parent.name} is locked by process {pid} on host {host} since {since}: "
                            f"wait for it, or if that job is dead delete {self.path} (locks from another host are "
                            f"taken over after lock_stale_hours={self.stale_hours:g})")
        elif take:
            log.warning(f"taking over the run's lock from process {pid} on {host}, {age_hours:.1f} h old "
                        f"(lock_stale_hours={self.stale_hours:g})")
        if take:
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("pid") == self.mine["pid"]:
                self.path.unlink()
            if not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()  # a run refused before it wrote anything leaves no folder
        self.held = False


def remove_interrupted_writes(directory: Path) -> None:
    """Temporary files of checkpoint writes that a killed process left behind (`.NAME.tmpPID`)."""
    for tmp in Path(directory).glob(".*.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if not pid.isdigit() or not _pid_alive(int(pid)) or int(pid) == os.getpid():
            tmp.unlink(missing_ok=True)


def run_files(directory: Path) -> list[str]:
    """The names of what a run left in its checkpoint folder: everything but the lock and interrupted writes."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(entry.name for entry in directory.iterdir()
                  if entry.name != LOCK_FILE and not (entry.name.startswith(".") and ".tmp" in entry.name))


def decide_resume(cfg, directory: Path) -> bool:
    """True when the run continues from `last.pt`. resume=auto continues when the run has one; resume=true requires
    one; resume=false refuses an existing run unless overwrite=true, which removes all of its files first. A folder
    holding an earlier run's files but no readable `last.pt` (deleted, a dangling link, a folder) is refused as
    resume=false refuses one: starting again would replace its best.pt."""
    mode = str(cfg.resume).lower()
    last = Path(directory) / LAST
    if cfg.overwrite:  # (with resume=true: refused by EngineSettings' relation)
        return False
    if last.is_file():
        if mode == "false":
            raise UserError(f"{last} exists from an earlier run and resume=false: resume=auto continues it, "
                            f"overwrite=true starts again and replaces it, name=... starts a separate run")
        return True
    found = run_files(directory)
    if mode == "true" and not found:
        raise UserError(f"resume=true but run {cfg.name} has no checkpoint {last}: start it without resume=true, "
                        f"or give the name of an earlier run")
    if found:
        shown = ", ".join(found[:SHOWN]) + (", ..." if len(found) > SHOWN else "")
        state = ("is a dangling link" if last.is_symlink() and not last.exists() else
                 "is not a file" if last.exists() or last.is_symlink() else "is missing")
        raise UserError(f"run {cfg.name} holds files of an earlier run ({shown} in {directory}) but its {LAST} "
                        f"{state}, so it cannot be continued: overwrite=true starts it again and removes them, "
                        f"name=... starts a separate run")
    return False


def clear_run(directory: Path, checkpoint_dir: Path) -> None:
    """overwrite=true: every file of the run's checkpoint folder (last, every best, centroids...) but the lock. Only
    ever a folder directly inside `checkpoint_dir` (named by one folder name, not a link leading elsewhere): never
    checkpoint_dir itself, another run's folder or a place outside it, whatever the run's name."""
    directory, checkpoint_dir = Path(directory), Path(checkpoint_dir)
    inside = (directory.parent == checkpoint_dir and is_folder_name(directory.name)
              and (not directory.exists() or directory.resolve().parent == checkpoint_dir.resolve()))
    if not inside:
        raise UserError(f"overwrite=true would clear {directory}, which is not a run folder directly inside "
                        f"checkpoint_dir={checkpoint_dir}: give name= one folder name (not '.' or '..', no '/')")
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
