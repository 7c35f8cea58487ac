"""The loop every training script runs: epochs of phases of steps, metrics, checkpoints (`last`, best per monitor),
resume at an epoch end or in the middle of a phase, orderly stops on signals, and a stop on a diverging loss.

A job's epoch is a list of `Phase`s, each a pass over a loader calling `step(batch, tracker)` per batch (MAXL: the
multi-task pass, then the meta pass; MeLa: one pass). The engine owns the batch loop, so it can checkpoint between
any two steps: on SIGTERM, SIGUSR1 or SIGINT (SLURM's pre-emption and time-limit signals, Ctrl-C), and every
`checkpoint_every` minutes. Such a checkpoint holds the run's place (epoch, phase, step), the running metrics of the
epoch and every RNG; loaders re-enter the pass at that batch with the same data (see `ShardedShuffleSampler`), so
the continued run ends bit-identical (on CPU) to an uninterrupted one.
"""
import json
import logging
import math
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from engine.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from engine.config import RESUMABLE_CHANGES, leaves
from engine.distributed import gather_objects, is_distributed
from engine.errors import RunInterrupted, UserError
from engine.metrics import MeanTracker, MetricsWriter
from engine.session import seed_everything

log = logging.getLogger("metalabel")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Under submitit, SLURM's --signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise) announces pre-emption and
# the time limit: checkpoint first, then hand over to submitit's handler, which requeues the job.
SUBMITIT_SIGNAL = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


@dataclass
class Phase:
    """One pass of an epoch: `step(batch, tracker)` for every batch of `loader` (a shuffled `session.loader`)."""

    name: str
    loader: torch.utils.data.DataLoader
    step: Callable


class TrainingJob(ABC):
    """What a script trains. Per epoch the engine runs `phases(epoch)`, then `end_epoch`, then `evaluate`.

    monitors: checkpoint name -> metric key; the checkpoint `<name>.pt` is written whenever that metric
    reaches a new maximum.
    """

    monitors: dict[str, str] = {}

    @abstractmethod
    def state_objects(self) -> dict:
        """Everything with `state_dict()`/`load_state_dict()` that a checkpoint must hold (models, optimisers...)."""

    @abstractmethod
    def phases(self, epoch: int) -> list[Phase]:
        """The passes of one epoch, in order."""

    def end_epoch(self, epoch: int) -> None:
        """After the epoch's phases, before its evaluation (learning-rate schedules)."""

    def evaluate(self, epoch: int) -> dict:
        return {}

    def summarize(self, history: list[dict]) -> dict:
        return {}

    def checkpoint_extras(self) -> dict:
        """Entries added to every checkpoint the job writes, next to the engine's own (which they cannot replace):
        what a later reader of the checkpoint needs to know about its state."""
        return {}


class StopSignals:
    """While training: SIGTERM, SIGUSR1 and SIGINT (and submitit's SIGUSR2) only note that the run must stop; the
    loop stops after the current step, checkpoints, and raises `RunInterrupted`."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        wanted = STOP_SIGNALS + ((SUBMITIT_SIGNAL,) if os.environ.get("SUBMITIT_EXECUTOR") else ())
        for signum in wanted:
            try:
                self.previous[signum] = signal.signal(signum, self._note)
            except ValueError:  # not the main thread (a test harness): run without orderly stops
                pass
        return self

    def _note(self, signum, frame):
        if self.received is None:
            self.received = signum
            log.warning(f"{signal.Signals(signum).name} received: stopping after the current step")

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.received == SUBMITIT_SIGNAL and callable(self.previous.get(SUBMITIT_SIGNAL)):
            self.previous[SUBMITIT_SIGNAL](SUBMITIT_SIGNAL, None)  # submitit requeues the job, then exits
        return False


def _agree(session, local: list[int]) -> list[int]:
    """The maximum over ranks of small integer flags (every rank stops at the same step)."""
    if not is_distributed():
        return local
    flags = torch.tensor(local, dtype=torch.int64, device=session.device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return flags.tolist()


def _check_finite(tracker: MeanTracker, session, epoch: int, phase: str, steps: int, last_path) -> None:
    """A diverged run stops here, before any checkpoint of it is written (the last good one is kept)."""
    bad = tracker.nonfinite()
    skipped = {k: v for k, v in tracker.totals.items() if k.endswith("skipped_steps")}
    flags = _agree(session, [bad[1] + 1 if bad else 0, max(skipped.values(), default=0)])
    lr_key = "learning_rate" if "learning_rate" in session.cfg else "lr"
    kept = f"the last good checkpoint {last_path} is kept" if last_path.is_file() else "no checkpoint was written"
    if flags[0]:
        name = bad[0] if bad else "a loss"
        raise UserError(f"{name} is not finite at epoch {epoch} step {flags[0] - 1} ({phase}): the run diverged; "
                        f"lower {lr_key} (now {session.cfg[lr_key]}) and start again with overwrite=true ({kept})")
    if steps and flags[1] * 2 > steps:
        raise UserError(f"the loss was not finite in {flags[1]} of {steps} steps of epoch {epoch} ({phase}): the run "
                        f"diverged; lower {lr_key} (now {session.cfg[lr_key]}) and start again with overwrite=true "
                        f"({kept})")


def checkpoint_payload(session, job, epoch: int, history: list[dict], best: dict, rng_states: list,
                       position: dict | None = None) -> dict:
    return {
        **job.checkpoint_extras(),  # first: the engine's entries win
        "script": session.script,
        "epoch": epoch,  # the last completed epoch
        "position": position,  # None at an epoch end; else where inside epoch + 1 the run stopped
        "config": OmegaConf.to_yaml(session.cfg, resolve=True),
        "state": {name: obj.state_dict() for name, obj in job.state_objects().items()},
        "rng": rng_states,  # one entry per rank
        "history": history,
        "best": best,
    }


def _check_same_run(saved_yaml: str, cfg, path) -> None:
    saved = leaves(OmegaConf.create(saved_yaml), skip=RESUMABLE_CHANGES | {"hydra"})
    current = leaves(cfg, skip=RESUMABLE_CHANGES | {"hydra"})
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        key = changed[0]
        raise UserError(f"run {cfg.name} has a checkpoint {path} written with {key}={saved.get(key)} (now "
                        f"{current.get(key)}): use the same settings, overwrite=true to start it again, or a new "
                        f"name=... to start another run")


def _restore(session, job):
    path = session.checkpoint_dir / "last.pt"
    payload = load_checkpoint(path, fix="delete it and run with overwrite=true, or give another name=...")
    if payload.get("script") != session.script:
        raise UserError(f"{path} was written by {payload.get('script')}.py, not {session.script}.py: "
                        f"check name=...")
    _check_same_run(payload["config"], session.cfg, path)
    for name, obj in job.state_objects().items():
        if name not in payload["state"]:
            raise UserError(f"{path} has no '{name}' state: it was written by another version or method")
        obj.load_state_dict(payload["state"][name])
    position = payload.get("position")
    states = payload["rng"]
    if len(states) == session.world_size:
        restore_rng_state(states[session.rank])
    else:
        log.warning(f"{path} was written by {len(states)} processes, this run has {session.world_size}: the "
                    f"random streams restart (seeded), so the continuation is not bit-identical")
        seed_everything(int(session.cfg.seed) + 1000 * (payload["epoch"] + 1) + session.rank)
        if position is not None:
            raise UserError(f"{path} holds a place inside epoch {position['epoch']} written by {len(states)} "
                            f"processes: continue it with {len(states)} processes")
    where = (f"epoch {position['epoch']} step {position['step']} ({position['phase_name']})" if position
             else f"epoch {payload['epoch'] + 1} step 0")
    log.info(f"resumed at {where} from {path}")
    return payload["epoch"] + 1, payload["history"], payload["best"], position


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def learning_rates(job) -> dict[str, float]:
    """The current learning rate of every optimiser of the job: `lr` for `optimizer`, `<x>_lr` for `<x>_optimizer`."""
    rates = {}
    for name, obj in job.state_objects().items():
        if isinstance(obj, torch.optim.Optimizer):
            key = "lr" if name == "optimizer" else f"{name.removesuffix('_optimizer')}_lr"
            rates[key] = obj.param_groups[0]["lr"]
    return rates


def rounded(value, digits: int = 6):
    """Floats of a summary to `digits` decimals (float noise such as 0.30000000000000004 is not information)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def fit(session, job: TrainingJob, epochs: int) -> dict:
    cfg = session.cfg
    last_path = session.checkpoint_dir / "last.pt"
    start, history, best, position = 0, [], {}, None
    if session.resuming:
        start, history, best, position = _restore(session, job)
        if position is not None:
            start = position["epoch"]
    else:
        seed_everything(int(cfg.seed) + session.rank)  # ranks draw different dropout and augmentation
    writer = MetricsWriter(session.run_dir, history) if session.is_main else None
    every = float(cfg.checkpoint_every) * 60
    run_began = time.perf_counter()
    last_save = time.monotonic()

    def save(epoch_done, position_now=None, improved=()):
        rng_states = gather_objects(capture_rng_state())
        if session.is_main:
            payload = checkpoint_payload(session, job, epoch_done, history, best, rng_states, position_now)
            for name in improved:
                save_checkpoint(session.checkpoint_dir / f"{name}.pt", payload)
            save_checkpoint(last_path, payload)

    with StopSignals() as signals:
        for epoch in range(start, epochs):
            resumed = position if position is not None and position["epoch"] == epoch else None
            began = time.perf_counter() - (resumed["elapsed"] if resumed else 0.0)
            session.set_epoch(epoch)
            row = {"epoch": epoch, **learning_rates(job)}
            passes = {}
            for index, phase in enumerate(job.phases(epoch)):
                pass_index = passes.get(id(phase.loader), 0)
                passes[id(phase.loader)] = pass_index + 1
                if resumed and index < resumed["phase"]:
                    continue  # finished before the interruption: its metrics are in resumed["row"]
                tracker, skip = MeanTracker(), 0
                if resumed and index == resumed["phase"]:
                    tracker.load_state_dict(resumed["trackers"][session.rank], session.device)
                    row, skip = dict(resumed["row"]), resumed["step"]
                phase.loader.sampler.start_pass(pass_index, skip)
                steps = len(phase.loader)
                bar = session.progress(phase.loader, f"epoch {epoch} {phase.name}", total=steps, initial=skip)
                for step, batch in enumerate(bar, start=skip):
                    tracker.step = step
                    phase.step(batch, tracker)
                    due = every > 0 and session.is_main and time.monotonic() - last_save >= every
                    stop, due = _agree(session, [signals.received or 0, int(due)])
                    if not (stop or due) or step + 1 == steps:
                        continue
                    _check_finite(tracker, session, epoch, phase.name, 0, last_path)
                    here = {"epoch": epoch, "phase": index, "phase_name": phase.name, "step": step + 1,
                            "row": row, "trackers": gather_objects(tracker.state_dict()),  # one per rank
                            "elapsed": time.perf_counter() - began}
                    save(epoch - 1, here)
                    last_save = time.monotonic()
                    if stop:
                        bar.close()
                        raise RunInterrupted(
                            f"interrupted by {signal.Signals(stop).name} at epoch {epoch} step {step + 1} "
                            f"({phase.name}); its place is saved in {last_path}: run the same command again to "
                            f"continue", 128 + stop)
                _check_finite(tracker, session, epoch, phase.name, steps, last_path)
                row |= tracker.result(session)
            position = None
            job.end_epoch(epoch)
            row |= job.evaluate(epoch)
            row["time_s"] = round(time.perf_counter() - began, 3)
            history.append(row)
            improved = [name for name, key in job.monitors.items()
                        if key in row and not math.isnan(row[key]) and row[key] > best.get(name, -math.inf)]
            for name in improved:
                best[name] = row[job.monitors[name]]
            if session.is_main:
                writer.write(row)
                elapsed = time.perf_counter() - run_began  # in this process: epochs start..epoch
                eta = elapsed / (epoch - start + 1) * (epochs - epoch - 1)
                log.info(f"epoch {epoch + 1}/{epochs} ({_clock(elapsed)} elapsed, ETA {_clock(eta)}): "
                         + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in row.items() if k != "epoch"))
            save(epoch, None, improved)
            last_save = time.monotonic()
            stop = _agree(session, [signals.received or 0])[0]
            if stop and epoch + 1 < epochs:
                raise RunInterrupted(f"interrupted by {signal.Signals(stop).name} after epoch {epoch}; {last_path} "
                                     f"holds it: run the same command again to continue", 128 + stop)
    summary = job.summarize(history)
    if session.is_main:
        writer.plot()
        summary = {"epochs": len(history), **summary,
                   "checkpoints": {name: {job.monitors[name]: value} for name, value in best.items()}}
        writer.write_hparams(cfg, summary)
        writer.close()
        summary = rounded(summary)
        (session.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("summary: " + json.dumps(summary))
        log.info(f"checkpoints: {session.checkpoint_dir}   metrics: {session.run_dir / 'metrics.csv'}")
    session.barrier()
    return summary
