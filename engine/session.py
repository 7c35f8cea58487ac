"""The runtime every script shares: device, seeds, logging, progress bars, data loaders, distributed ranks.
A script builds its parts from the config and a `Session`, then calls `session.fit(job)` (engine/trainer.py)."""
import logging
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from engine.checkpoint import load_checkpoint
from engine.distributed import SeededBatches, ShardedShuffleSampler, adopt_submitit_ranks, is_distributed
from engine.errors import UserError
from engine.rng import seed_everything
from engine.runs import RunLock, clear_run, decide_resume, remove_interrupted_writes
from engine.script import Script
from engine.settings import MAX_AUTO_WORKERS, is_folder_name
from engine.trainer import fit
from engine.workspace import DEFAULT_WORKSPACE

log = logging.getLogger("metalabel")


def _quiet_worker(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM/SIGUSR1 to the main process, which checkpoints and then stops them.
    (Their random draws are seeded per batch: see `SeededBatches`.)"""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def resolve_threads(value, local_world_size: int) -> int:
    """`auto`: $OMP_NUM_THREADS when set (torchrun sets it), else the cores this process may use shared by the
    processes of this node (torchrun, SLURM tasks)."""
    if value != "auto":
        return int(value)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, cores_per_process(local_world_size))


def resolve_workers(value, local_world_size: int) -> int:
    """`auto`, for images on the CPU: the cores this process may use shared by the processes of this node, one
    left to the main process, between 1 and MAX_AUTO_WORKERS (never more than the cores, which DataLoader warns
    about)."""
    if value != "auto":
        return int(value)
    return min(MAX_AUTO_WORKERS, max(1, cores_per_process(local_world_size) - 1))


def cores_per_process(local_world_size: int) -> int:
    """The cores this process may use, shared by the `local_world_size` processes of this node."""
    return len(os.sched_getaffinity(0)) // max(1, local_world_size)


def resolve_device(name: str, local_rank: int, data_device: str) -> torch.device:
    """The values of device and data_device were checked (engine/settings.py) before the session starts."""
    if "cuda" in (name, data_device) and not torch.cuda.is_available():
        key = "device" if name == "cuda" else "data_device"
        raise UserError(f"{key}=cuda but no CUDA GPU is visible: use {key}=cpu or {key}=auto")
    if data_device == "cuda" and name == "cpu":
        raise UserError("data_device=cuda but the model trains on the CPU (device=cpu): use data_device=auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


class Session:
    """One run of a script. `cfg` is the resolved Hydra config; `run_dir` receives config, log and metrics; `spec`
    is what the script hands the engine (engine/script.py): `session.script` is its name."""

    log = log  # console and the run's log file (rank 0 only in a distributed run)

    def __init__(self, cfg: DictConfig, run_dir: Path, spec: Script):
        self.cfg = cfg
        self.spec = spec
        self.script = spec.name  # checkpoints record it: a run is continued by the script that started it
        self.run_dir = Path(run_dir)
        self._join_ranks()
        self._set_up_compute()
        self._open_checkpoint_folder()
        self.inputs = {}  # the checkpoints the run starts from (check_inputs)
        self.training = False  # set by fit once the run is opened (restored or seeded): from then on it records
        self._epoch_listeners = []  # samplers and task datasets that draw per epoch
        seed_everything(int(cfg.seed))  # the same on every rank: models start identical
        if self.is_main:
            self._record_run()

    def _join_ranks(self) -> None:
        """This process's rank and device; the process group of a distributed run. Only rank 0 logs info."""
        adopt_submitit_ranks()
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = resolve_device(self.cfg.device, self.local_rank, self.cfg.data_device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0
        if not self.is_main:
            logging.getLogger().setLevel(logging.WARNING)

    def _set_up_compute(self) -> None:
        """Memory layout, precision, compile and CPU threads from the config."""
        cfg = self.cfg
        self.channels_last = bool(cfg.channels_last)
        cuda = self.device.type == "cuda"
        self.precision = cfg.precision
        if cfg.precision == "auto":  # bf16 autocast on a CUDA GPU that supports it, fp32 elsewhere
            self.precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
        self.compile_enabled = cuda if cfg.compile == "auto" else cfg.compile
        torch.set_num_threads(resolve_threads(cfg.threads, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed input sizes throughout a run

    def _open_checkpoint_folder(self) -> None:
        """The run's checkpoint folder; for a script that trains a run: decide to continue or start it (every rank
        decides before anything is removed), lock it, clear it with overwrite=true."""
        if not is_folder_name(self.cfg.name):  # validated before; a config made by hand is checked here too
            raise UserError(f"name={self.cfg.name}: a run name is one folder name (not '.' or '..', no '/'): "
                            f"give name=... a plain name")
        self.checkpoint_dir = Path(self.cfg.checkpoint_dir) / self.cfg.name
        self.lock = None
        self.resuming = False  # continuing the run from its last checkpoint (engine/trainer.py restores it)
        if not self.spec.writes_checkpoints:
            return
        self.resuming = decide_resume(self.cfg, self.checkpoint_dir)
        self.barrier()
        if self.is_main:
            self.lock = RunLock(self.checkpoint_dir, self.cfg.lock_stale_hours)
            self.lock.acquire()
            remove_interrupted_writes(self.checkpoint_dir)
            if self.cfg.overwrite:
                clear_run(self.checkpoint_dir, Path(self.cfg.checkpoint_dir))
        self.barrier()

    def _record_run(self) -> None:
        """The run directory with the resolved config; where everything goes, in the log."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        source = "$WORKSPACE" if os.environ.get("WORKSPACE") else f"WORKSPACE unset, default {DEFAULT_WORKSPACE}"
        log.info(f"workspace: {cfg.workspace} ({source})")
        log.info(f"run: {cfg.name}   checkpoints: {self.checkpoint_dir}")
        log.info(f"run directory: {self.run_dir}")
        log.info(f"device: {self.device}" + (f", {self.world_size} processes" if self.world_size > 1 else "")
                 + f", precision {self.precision}" + (", compiled" if self.compile_enabled else ""))

    def check_inputs(self, inputs: dict[str, str]) -> None:
        """The checkpoints this run starts from (key -> `file_identity`), recorded in each of its checkpoints. A run
        continued from another input than it started from is refused (its state would mix the two): call before
        using the inputs."""
        self.inputs = dict(inputs)
        if not self.resuming:
            return
        last = self.checkpoint_dir / "last.pt"
        saved = load_checkpoint(last, fix="delete it and run with overwrite=true, or give another name=...")
        recorded = saved.get("inputs")
        if recorded is None:
            log.warning(f"{last} does not record the checkpoints it started from (written before they were "
                        f"recorded): continuing without checking {', '.join(inputs)}")
            return
        for key, identity in inputs.items():
            if key in recorded and recorded[key] != identity:
                raise UserError(f"run {self.cfg.name} started from another {key} checkpoint than "
                                f"{key}={self.cfg[key]} now holds (sha256 {recorded[key][:12]}... then, "
                                f"{identity[:12]}... now; it was extended or replaced): overwrite=true starts this "
                                f"run again from it, name=... starts a separate run")

    # ---- models and batches -------------------------------------------------------------------------
    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move a model to the run's device (and memory layout). Checkpoints hold this module's state."""
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def distribute(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module to train with: DistributedDataParallel over the ranks (gradients averaged in backward),
        compiled when `compile` is on; the module itself in one process without compile."""
        if self.world_size > 1:
            module = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(module) if self.compile_enabled else module

    def autocast(self):
        """Mixed precision for forward passes when `precision=bf16` (a no-op context in fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device, non_blocking=True)
        if self.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    # ---- data -------------------------------------------------------------------------------------------
    def loader(self, dataset, batch_size: int, shuffle: bool):
        """A DataLoader over this rank's share of `dataset`; `batch_size` is the global batch (split over ranks).
        Shuffled: see `ShardedShuffleSampler` and `SeededBatches`. Datasets with `set_epoch` are told the epoch;
        datasets with `images_on` keep their uint8 images on the training GPU when `data_device` lets them."""
        if batch_size % self.world_size:
            raise UserError(f"batch size {batch_size} is not divisible by the {self.world_size} processes: "
                            f"choose a multiple of {self.world_size}")
        local_batch = batch_size // self.world_size
        dataset, on_device = self._images_on_device(dataset)
        if hasattr(dataset, "set_epoch"):
            self._epoch_listeners.append(dataset)
        if shuffle:
            sampler = ShardedShuffleSampler(len(dataset), int(self.cfg.seed), self.rank, self.world_size, local_batch)
            self._epoch_listeners.append(sampler)
            dataset = SeededBatches(dataset)
        else:  # evaluation: rank r takes items r, r + world_size, ... in order (no padding, every item once)
            sampler = range(self.rank, len(dataset), self.world_size)
        # Images on the GPU are gathered and augmented in the main process: a worker process cannot use them.
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        workers = 0 if on_device else resolve_workers(self.cfg.num_workers, local_processes)
        return torch.utils.data.DataLoader(
            dataset, batch_size=local_batch, sampler=sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda" and not on_device, worker_init_fn=_quiet_worker if workers else None,
            persistent_workers=False, generator=torch.Generator())

    def _images_on_device(self, dataset) -> tuple[object, bool]:
        """(`dataset` with its images on the training GPU, True) when data_device lets them be there (auto: when
        they fit in data_device_memory_share of its free memory and num_workers does not ask for worker
        processes), else (`dataset`, False)."""
        wanted = self.cfg.data_device
        if self.device.type != "cuda" or wanted == "cpu" or not hasattr(dataset, "images_on"):
            return dataset, False
        if wanted == "auto" and self.cfg.num_workers not in ("auto", 0):
            return dataset, False
        size, free = dataset.image_bytes(), torch.cuda.mem_get_info(self.device)[0]
        share = float(self.cfg.data_device_memory_share)
        if wanted == "auto" and size > share * free:
            log.info(f"data: {size / 2**20:.0f} MiB of images exceed data_device_memory_share={share:g} of the "
                     f"GPU's {free / 2**20:.0f} MiB free: kept on the CPU, batches loaded by workers")
            return dataset, False
        return dataset.images_on(self.device), True

    def set_epoch(self, epoch: int) -> None:
        for listener in self._epoch_listeners:
            listener.set_epoch(epoch)

    def progress(self, iterable, desc: str, total: int | None = None, leave: bool = False, initial: int = 0):
        """A tqdm bar; in a non-interactive log (SLURM, a file) a line every minute instead of every update."""
        interactive = sys.stderr.isatty()
        return tqdm(iterable, desc=desc, total=total, leave=leave, initial=initial, dynamic_ncols=interactive,
                    mininterval=0.1 if interactive else 60, disable=not (self.cfg.progress and self.is_main))

    # ---- training ---------------------------------------------------------------------------------------
    def fit(self, job, epochs: int) -> dict:
        return fit(self, job, epochs)

    def barrier(self) -> None:
        if is_distributed():
            dist.barrier()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
        if is_distributed():
            dist.destroy_process_group()
