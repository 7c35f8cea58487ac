"""The loop every training script runs: epochs of phases of steps, metrics, checkpoints (`last`, best per monitor),
resume at an epoch end or in the middle of a phase, orderly stops on signals, and a stop on a diverging loss.

The engine owns the batch loop, so it can checkpoint between any two steps: on SIGTERM, SIGUSR1 or SIGINT (SLURM's
pre-emption and time-limit signals, Ctrl-C), and every `checkpoint_every` minutes. Such a checkpoint holds the
run's place (epoch, phase, step), the epoch's running metrics and every RNG; loaders re-enter the pass at that
batch with the same data (`ShardedShuffleSampler`), so the continued run ends bit-identical (on CPU).
"""
import contextlib
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

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.config import changed_setting
from engine.distributed import gather_objects, is_distributed
from engine.errors import RunInterrupted, UserError
from engine.metrics import MeanTracker, MetricsWriter
from engine.rng import capture_rng_state, restore_rng_state, seed_everything

log = logging.getLogger("metalabel")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Under submitit, SLURM's --signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise) announces pre-emption and
# the time limit: checkpoint first, then hand over to submitit's handler, which requeues the job.
SUBMITIT_SIGNAL = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


@dataclass
class Phase:
    """One pass of an epoch: `step(batch, tracker)` for every batch of `loader` (a shuffled `session.loader`).
    MAXL's epoch: the multi-task pass, then the meta pass; MeLa's: one pass."""

    name: str
    loader: torch.utils.data.DataLoader
    step: Callable


class TrainingJob(ABC):
    """What a script trains. Per epoch the engine runs `phases(epoch)`, then `end_epoch`, then `evaluate`.

    monitors: checkpoint name -> metric key; the checkpoint `<name>.pt` is written whenever that metric
    reaches a new maximum.
    headline: the metric keys a report shows by default for this run (written into summary.json).
    skipped_steps_metric: the tracker total counting the steps skipped for a non-finite loss, if the job skips
    any; the run stops as diverged when more than half of a phase's steps were skipped.
    """

    monitors: dict[str, str] = {}
    headline: list[str] = []
    skipped_steps_metric: str | None = None

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
            with contextlib.suppress(ValueError):  # not the main thread (a test harness): run without orderly stops
                self.previous[signum] = signal.signal(signum, self._note)
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


def _agree(session, local: list[int]) -> list[int]:
    """The maximum over ranks of small integer flags (every rank stops at the same step)."""
    if not is_distributed():
        return local
    flags = torch.tensor(local, dtype=torch.int64, device=session.device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return flags.tolist()


def _check_same_run(saved_yaml: str, session, path) -> None:
    """The checkpoint's settings are this run's, bar the neutral ones (which a continued run may change)."""
    if changed := changed_setting(saved_yaml, session.cfg, session.spec):
        key, saved, now = changed
        raise UserError(f"run {session.cfg.name} has a checkpoint {path} written with {key}={saved} (now {now}): use "
                        f"the same settings, overwrite=true to start it again, or a new name=... to start another run")


def _check_not_longer(payload: dict, session, epochs: int, path) -> None:
    """A run is never continued by a command asking for fewer epochs than it has: its results would be the longer
    run's under a config saying otherwise."""
    position = payload.get("position")
    has = payload["epoch"] + 1 + (1 if position is not None else 0)  # epochs done, or begun
    if has > epochs:
        done = f"{payload['epoch'] + 1} epochs" + (f" and part of epoch {has}" if position is not None else "")
        raise UserError(f"run {session.cfg.name} already has {done} ({path}) but epochs={epochs} asks for fewer: "
                        f"give epochs={has} (or more) to continue it, name=... to train a separate {epochs}-epoch run, "
                        f"overwrite=true to start it again with epochs={epochs}, or evaluate an earlier epoch's "
                        f"checkpoint if one is kept")


def _restore(session, job, epochs: int):
    path = session.checkpoint_dir / "last.pt"
    fix = "overwrite=true starts the run again (removing its files), name=... starts a separate run"
    payload = load_checkpoint(path, fix=fix)
    if payload.get("script") != session.script:
        writer = f"{payload['script']}.py" if payload.get("script") else "a script it does not name"
        raise UserError(f"{path} was written by {writer}, not {session.script}.py: check name=..., or {fix}")
    _check_same_run(payload["config"], session, path)
    _check_not_longer(payload, session, epochs, path)
    for name in payload.get("best", {}):  # the run's best checkpoints must still be readable (nothing unnoticed)
        load_checkpoint(session.checkpoint_dir / f"{name}.pt", fix=f"the run's {name}.pt is damaged: {fix}")
    for name, obj in job.state_objects().items():
        if name not in payload["state"]:
            raise UserError(f"{path} has no '{name}' state (written by another version or method): {fix}")
        try:
            obj.load_state_dict(payload["state"][name])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}: its '{name}' state does not fit this run's {name} ({reason[:200]}): {fix}") \
                from None
    position = payload.get("position")
    states = payload["rng"]
    if len(states) == session.world_size:
        restore_rng_state(states[session.rank])
    else:
        log.warning(f"{path} was written by {len(states)} processes, this run has {session.world_size}: the "
                    f"random streams restart (seeded), so the continuation is not bit-identical")
        seed_everything(int(session.cfg.seed) + 1000 * (payload["epoch"] + 1) + session.rank)
        if position is not None:
            raise UserError(f"{path} holds a place inside epoch {position['epoch'] + 1} written by {len(states)} "
                            f"processes: continue it with {len(states)} processes")
    if position is not None:
        where = f"at epoch {position['epoch'] + 1}/{epochs} step {position['step']} ({position['phase_name']})"
    elif payload["epoch"] + 1 < epochs:
        where = f"at epoch {payload['epoch'] + 2}/{epochs} step 0"
    else:
        where = f"after epoch {payload['epoch'] + 1}, the last of {epochs}"
    log.info(f"resumed {where} from {path}")
    return payload["epoch"] + 1, payload["history"], payload["best"], position


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def learning_rates(job) -> dict[str, float]:
    """The current learning rate of every optimiser of the job: `lr` for `optimizer`, `<x>_lr` for `<x>_optimizer`."""
    return {("lr" if name == "optimizer" else f"{name.removesuffix('_optimizer')}_lr"): obj.param_groups[0]["lr"]
            for name, obj in job.state_objects().items() if isinstance(obj, torch.optim.Optimizer)}


def rounded(value):
    """Floats of a summary to 6 decimals (float noise such as 0.30000000000000004 is not information)."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def fit(session, job: TrainingJob, epochs: int) -> dict:
    """Train `job` for `epochs` epochs (from its last checkpoint when the session continues a run); its summary."""
    run = Run(session, job, epochs)  # restores the last checkpoint, or seeds a new run
    session.training = True
    with StopSignals() as signals:
        for epoch in range(run.start, epochs):
            run.begin_epoch(epoch)
            for index, phase, pass_index in run.phases_left(job.phases(epoch)):
                run.train_phase(index, phase, pass_index, signals)
            run.end_epoch(signals)
    return run.finish()


class Run:
    """The state of one `fit`: the epochs done (`history`), the best value of each monitor, where the run started
    in this process and when it last saved; within an epoch, its number, metrics row and start time.

    Epochs are numbered from 0 inside (metrics.csv, checkpoints) and from 1 in every message (`epoch 1/N`)."""

    def __init__(self, session, job: TrainingJob, epochs: int):
        self.session, self.job, self.epochs = session, job, epochs
        self.last_path = session.checkpoint_dir / "last.pt"
        self.start, self.history, self.best, self.position = 0, [], {}, None
        if session.resuming:
            self.start, self.history, self.best, self.position = _restore(session, job, epochs)
            if self.position is not None:  # inside an epoch: that epoch continues
                self.start = self.position["epoch"]
        else:
            seed_everything(int(session.cfg.seed) + session.rank)  # ranks draw different dropout and augmentation
        self.writer = MetricsWriter(session.run_dir, self.history) if session.is_main else None
        self.every = float(session.cfg.checkpoint_every) * 60
        self.began = time.perf_counter()
        self.last_save = time.monotonic()

    # ---- an epoch ---------------------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        # the place inside this epoch where an interrupted run stopped, if any
        self.resumed = self.position if self.position is not None and self.position["epoch"] == epoch else None
        self.epoch_began = time.perf_counter() - (self.resumed["elapsed"] if self.resumed else 0.0)
        self.session.set_epoch(epoch)
        self.row = {"epoch": epoch, **learning_rates(self.job)}

    def phases_left(self, phases: list[Phase]):
        """(index, phase, pass over its loader) of each phase still to run this epoch: on resume, the phases that
        finished before the interruption are passed over (their metrics are in the saved row)."""
        passes = {}
        for index, phase in enumerate(phases):
            pass_index = passes.get(id(phase.loader), 0)
            passes[id(phase.loader)] = pass_index + 1
            if self.resumed is None or index >= self.resumed["phase"]:
                yield index, phase, pass_index

    def train_phase(self, index: int, phase: Phase, pass_index: int, signals: StopSignals) -> None:
        """The phase's steps; between two of them, a checkpoint of the place when one is due or a signal asks to
        stop (and then the stop)."""
        session, tracker, skip = self.session, MeanTracker(), 0
        if self.resumed is not None and index == self.resumed["phase"]:
            tracker.load_state_dict(self.resumed["trackers"][session.rank], session.device)
            self.row, skip = dict(self.resumed["row"]), self.resumed["step"]
        phase.loader.sampler.start_pass(pass_index, skip)
        steps = len(phase.loader)
        bar = session.progress(phase.loader, f"epoch {self.epoch + 1}/{self.epochs} {phase.name}", total=steps,
                               initial=skip)
        for step, batch in enumerate(bar, start=skip):
            tracker.step = step
            try:
                phase.step(batch, tracker)
            except RuntimeError as exc:  # a learning rate or update too large for the weights' float type
                if "overflow" not in str(exc):
                    raise
                self._diverged(f"an update overflowed at epoch {self.epoch + 1}/{self.epochs} step {step} "
                               f"({str(exc).strip().splitlines()[0]})", phase.name)
            # the signal asking to stop, and whether checkpoint_every minutes have passed: the same on every rank
            due = self.every > 0 and session.is_main and time.monotonic() - self.last_save >= self.every
            stop, due = _agree(session, [signals.received or 0, int(due)])
            if (stop or due) and step + 1 < steps:
                self._save_place(index, phase, step + 1, tracker)
                if stop:
                    bar.close()
                    raise RunInterrupted(
                        f"interrupted by {signal.Signals(stop).name} at epoch {self.epoch + 1}/{self.epochs} step "
                        f"{step + 1} ({phase.name}); its place is saved in {self.last_path}: run the same command "
                        f"again to continue", 128 + stop)
        self._check_finite(tracker, phase.name, steps)
        self.row |= tracker.result(session)

    def end_epoch(self, signals: StopSignals) -> None:
        """The job's end of epoch and evaluation, the best checkpoints, the metrics row and log line, `last.pt`;
        then the stop a signal asked for during the epoch."""
        epoch, row = self.epoch, self.row
        self.job.end_epoch(epoch)
        row |= self.job.evaluate(epoch)
        row["time_s"] = round(time.perf_counter() - self.epoch_began, 3)
        self.history.append(row)
        improved = [name for name, key in self.job.monitors.items()
                    if key in row and not math.isnan(row[key]) and row[key] > self.best.get(name, -math.inf)]
        for name in improved:
            self.best[name] = row[self.job.monitors[name]]
        if self.session.is_main:
            self.writer.write(row)
            elapsed = time.perf_counter() - self.began  # in this process: epochs start..epoch
            eta = elapsed / (epoch - self.start + 1) * (self.epochs - epoch - 1)
            log.info(f"epoch {epoch + 1}/{self.epochs} ({_clock(elapsed)} elapsed, ETA {_clock(eta)}): "
                     + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in row.items() if k != "epoch"))
        self._save(epoch, None, improved)
        stop = _agree(self.session, [signals.received or 0])[0]
        if stop and epoch + 1 < self.epochs:
            raise RunInterrupted(f"interrupted by {signal.Signals(stop).name} after epoch {epoch + 1}/{self.epochs}; "
                                 f"{self.last_path} holds it: run the same command again to continue", 128 + stop)

    # ---- the end ----------------------------------------------------------------------------------------------
    def finish(self) -> dict:
        """The job's summary with the epochs run, the best checkpoints and the headline metrics: summary.json,
        TensorBoard's HPARAMS, curves.png."""
        session, job = self.session, self.job
        summary = job.summarize(self.history)
        if session.is_main:
            self.writer.plot()
            headline = {"headline": list(job.headline)} if job.headline else {}
            checkpoints = {name: {job.monitors[name]: value} for name, value in self.best.items()}
            summary = {"epochs": len(self.history), **headline, **summary, "checkpoints": checkpoints}
            self.writer.write_hparams(session.cfg, summary)
            self.writer.close()
            summary = rounded(summary)
            (session.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log.info("summary: " + json.dumps(summary))
            log.info(f"checkpoints: {session.checkpoint_dir}   metrics: {session.run_dir / 'metrics.csv'}")
        session.barrier()
        return summary

    # ---- checkpoints and stops --------------------------------------------------------------------------------
    def _save_place(self, index: int, phase: Phase, steps_done: int, tracker: MeanTracker) -> None:
        """`last.pt` holding the place inside the epoch: the epoch before it is the last completed one."""
        self._check_finite(tracker, phase.name, 0)
        here = {"epoch": self.epoch, "phase": index, "phase_name": phase.name, "step": steps_done,
                "row": self.row, "trackers": gather_objects(tracker.state_dict()),  # one per rank
                "elapsed": time.perf_counter() - self.epoch_began}
        self._save(self.epoch - 1, here)

    def _save(self, epoch_done: int, position: dict | None = None, improved=()) -> None:
        session, rng_states = self.session, gather_objects(capture_rng_state())
        if session.is_main:
            payload = {
                **self.job.checkpoint_extras(),  # first: the engine's entries win
                "script": session.script,
                "inputs": dict(getattr(session, "inputs", {})),  # the checkpoints the run started from (key -> sha256)
                "epoch": epoch_done,  # the last completed epoch
                "position": position,  # None at an epoch end; else where inside epoch + 1 the run stopped
                "config": OmegaConf.to_yaml(session.cfg, resolve=True),
                "state": {name: obj.state_dict() for name, obj in self.job.state_objects().items()},
                "rng": rng_states,  # one entry per rank
                "history": self.history,
                "best": self.best,
            }
            for name in improved:
                save_checkpoint(session.checkpoint_dir / f"{name}.pt", payload)
            save_checkpoint(self.last_path, payload)
        self.last_save = time.monotonic()

    def _check_finite(self, tracker: MeanTracker, phase: str, steps: int) -> None:
        """A diverged run stops here, before any checkpoint of it is written (the last good one is kept): a loss
        that was not finite, or (`steps` given) more than half of the phase's steps skipped for one."""
        session, metric = self.session, self.job.skipped_steps_metric
        bad = tracker.nonfinite()
        skipped = tracker.totals.get(metric, 0) if metric else 0
        flags = _agree(session, [bad[1] + 1 if bad else 0, skipped])
        epoch = f"epoch {self.epoch + 1}/{self.epochs}"
        if flags[0]:
            what = f"{bad[0] if bad else 'a loss'} is not finite at {epoch} step {flags[0] - 1}"
        elif steps and flags[1] * 2 > steps:
            what = f"the loss was not finite in {flags[1]} of {steps} steps of {epoch}"
        else:
            return
        self._diverged(what, phase)

    def _diverged(self, what: str, phase: str) -> None:
        session = self.session
        lr_key = session.spec.lr_key
        lower = f"lower {lr_key} (now {session.cfg[lr_key]})" if lr_key else "lower the learning rate"
        kept = (f"the last good checkpoint {self.last_path} is kept" if self.last_path.is_file()
                else "no checkpoint was written")
        raise UserError(f"{what} ({phase}): the run diverged; {lower} and start again with overwrite=true ({kept})")
