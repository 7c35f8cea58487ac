"""The runtime every script shares: device, seeds, logging, progress bars, data loaders, distributed ranks.

A script builds its parts from the config and a `Session`, then calls `session.fit(job)` (engine/trainer.py).
"""
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from engine.errors import UserError
from engine.workspace import DEFAULT_WORKSPACE

log = logging.getLogger("metalabel")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device); data-loader workers are seeded from torch (see `loader`)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # torch gives each worker `base_seed + worker_id`, with base_seed drawn from the seeded main process RNG.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"device={name} is not one of auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is visible: use device=cpu or device=auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


class Session:
    """One run of a script. `cfg` is the resolved Hydra config; `run_dir` receives config, log and metrics."""

    log = log  # console and the run's log file (rank 0 only in a distributed run)

    def __init__(self, cfg: DictConfig, run_dir: Path, script: str):
        self.cfg = cfg
        self.script = script
        self.run_dir = Path(run_dir)
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = resolve_device(cfg.device, self.local_rank)
        if self.world_size > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0
        if not self.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        self.channels_last = bool(cfg.channels_last)
        self.checkpoint_dir = Path(cfg.checkpoint_dir) / cfg.name
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes throughout a run
        seed_everything(int(cfg.seed))
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            source = "$WORKSPACE" if os.environ.get("WORKSPACE") else f"WORKSPACE unset, default {DEFAULT_WORKSPACE}"
            log.info(f"workspace: {cfg.workspace} ({source})")
            log.info(f"run directory: {self.run_dir}")
            log.info(f"device: {self.device}" + (f", {self.world_size} processes" if self.world_size > 1 else ""))

    # ---- models and batches -------------------------------------------------------------------------
    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move a model to the run's device (and memory layout)."""
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device, non_blocking=True)
        if self.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    # ---- data -------------------------------------------------------------------------------------------
    def loader(self, dataset, batch_size: int, shuffle: bool, drop_last: bool = False, **kwargs):
        """A DataLoader whose order and augmentation follow the seeded global RNG (so `resume` is exact)."""
        workers = int(self.cfg.num_workers)
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=workers,
            pin_memory=self.device.type == "cuda", worker_init_fn=_seed_worker if workers else None,
            persistent_workers=False, **kwargs)

    def progress(self, iterable, desc: str, total: int | None = None, leave: bool = False):
        return tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True,
                    disable=not (self.cfg.progress and self.is_main))

    # ---- training ---------------------------------------------------------------------------------------
    def fit(self, job, epochs: int) -> dict:
        from engine.trainer import fit

        return fit(self, job, epochs)

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
