"""The epoch loop every training script runs: metrics, checkpoints (`last`, best per monitor), resume."""
import json
import logging
import math
import time
from abc import ABC, abstractmethod

from omegaconf import OmegaConf

from engine.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from engine.distributed import gather_objects
from engine.errors import UserError
from engine.metrics import MetricsWriter
from engine.session import seed_everything

log = logging.getLogger("metalabel")

# Keys that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"resume", "overwrite", "epochs", "progress", "device", "num_workers", "workspace",
                     "data_dir", "checkpoint_dir", "compile"}


class TrainingJob(ABC):
    """What a script trains. The engine calls `train_epoch` then `evaluate` once per epoch.

    monitors: checkpoint name -> metric key; the checkpoint `<name>.pt` is written whenever that metric
    reaches a new maximum.
    """

    monitors: dict[str, str] = {}

    @abstractmethod
    def state_objects(self) -> dict:
        """Everything with `state_dict()`/`load_state_dict()` that a checkpoint must hold (models, optimisers...)."""

    @abstractmethod
    def train_epoch(self, epoch: int) -> dict:
        """One epoch of training; returns its metrics."""

    def evaluate(self, epoch: int) -> dict:
        return {}

    def summarize(self, history: list[dict]) -> dict:
        return {}


def checkpoint_payload(session, job, epoch: int, history: list[dict], best: dict, rng_states: list) -> dict:
    return {
        "script": session.script,
        "epoch": epoch,
        "config": OmegaConf.to_yaml(session.cfg, resolve=True),
        "state": {name: obj.state_dict() for name, obj in job.state_objects().items()},
        "rng": rng_states,  # one entry per rank
        "history": history,
        "best": best,
    }


def _check_same_run(saved_yaml: str, cfg, path) -> None:
    saved = OmegaConf.to_container(OmegaConf.create(saved_yaml))
    current = OmegaConf.to_container(cfg, resolve=True)
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if changed:
        key = changed[0]
        raise UserError(f"resume=true but {path} was written with {key}={saved.get(key)} (now {current.get(key)}): "
                        f"use the same settings, or a new name=... to start another run")


def _restore(session, job):
    path = session.checkpoint_dir / "last.pt"
    if not path.is_file():
        raise UserError(f"resume=true but run {session.cfg.name} has no checkpoint {path}: start it without "
                        f"resume=true, or give the name of an earlier run")
    payload = load_checkpoint(path, fix="delete it and run with resume=false, or give another name=...")
    if payload.get("script") != session.script:
        raise UserError(f"{path} was written by {payload.get('script')}.py, not {session.script}.py: "
                        f"check name=...")
    _check_same_run(payload["config"], session.cfg, path)
    for name, obj in job.state_objects().items():
        if name not in payload["state"]:
            raise UserError(f"{path} has no '{name}' state: it was written by another version or method")
        obj.load_state_dict(payload["state"][name])
    states = payload["rng"]
    if len(states) == session.world_size:
        restore_rng_state(states[session.rank])
    else:
        log.warning(f"{path} was written by {len(states)} processes, this run has {session.world_size}: the "
                    f"random streams restart (seeded), so the continuation is not bit-identical")
        seed_everything(int(session.cfg.seed) + 1000 * (payload["epoch"] + 1) + session.rank)
    log.info(f"resumed from {path} after epoch {payload['epoch']}")
    return payload["epoch"] + 1, payload["history"], payload["best"]


def fit(session, job: TrainingJob, epochs: int) -> dict:
    cfg = session.cfg
    last_path = session.checkpoint_dir / "last.pt"
    start, history, best = 0, [], {}
    if cfg.resume:
        start, history, best = _restore(session, job)
    else:
        seed_everything(int(cfg.seed) + session.rank)  # ranks draw different dropout and augmentation
    writer = MetricsWriter(session.run_dir, history) if session.is_main else None
    for epoch in range(start, epochs):
        began = time.perf_counter()
        session.set_epoch(epoch)
        row = {"epoch": epoch, **job.train_epoch(epoch), **job.evaluate(epoch)}
        row["time_s"] = round(time.perf_counter() - began, 3)
        history.append(row)
        rng_states = gather_objects(capture_rng_state())
        if not session.is_main:
            continue
        writer.write(row)
        log.info(f"epoch {epoch}: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in row.items() if k != "epoch"))
        improved = [name for name, key in job.monitors.items()
                    if key in row and not math.isnan(row[key]) and row[key] > best.get(name, -math.inf)]
        for name in improved:
            best[name] = row[job.monitors[name]]
        payload = checkpoint_payload(session, job, epoch, history, best, rng_states)
        for name in improved:
            save_checkpoint(session.checkpoint_dir / f"{name}.pt", payload)
        save_checkpoint(last_path, payload)
    summary = job.summarize(history)
    if session.is_main:
        writer.plot()
        writer.close()
        summary = {"epochs": len(history), **summary,
                   "checkpoints": {name: {job.monitors[name]: value} for name, value in best.items()}}
        (session.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("summary: " + json.dumps(summary))
        log.info(f"checkpoints: {session.checkpoint_dir}   metrics: {session.run_dir / 'metrics.csv'}")
    session.barrier()
    return summary
