"""Hydra entry point of every script: composes the config, opens a `Session`, turns `UserError` into one line."""
import functools
import logging
import os
import sys
import time
from pathlib import Path

import hydra
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from engine.errors import UserError
from engine.session import Session
from engine.workspace import workspace_root

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "config")
RUN_STAMP = "METALABEL_RUN_STAMP"

if not OmegaConf.has_resolver("env_workspace"):
    OmegaConf.register_new_resolver("env_workspace", lambda: str(workspace_root()))
    # The run directory's time stamp; under torchrun every rank takes rank 0's (see _join_process_group).
    # `${flag:${key},_text}`: the text when the key is true, else nothing (run names like the original's).
    OmegaConf.register_new_resolver("flag", lambda value, text: text if value else "")
    OmegaConf.register_new_resolver("run_stamp", lambda: os.environ.get(RUN_STAMP)
                                    or time.strftime("%Y-%m-%d_%H-%M-%S"), use_cache=True)


def _join_process_group() -> None:
    """Under torchrun: join the process group before Hydra starts, so that every rank agrees on one run
    directory (rank 0's time stamp), and let only rank 0 write Hydra's own files."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or dist.is_initialized():
        return
    import torch

    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    stamp = [time.strftime("%Y-%m-%d_%H-%M-%S")]
    dist.broadcast_object_list(stamp, src=0)
    os.environ[RUN_STAMP] = stamp[0]
    if dist.get_rank() != 0:
        sys.argv.append("hydra.output_subdir=null")


def hydra_main(config_name: str):
    """Decorate `main(cfg, session)`: Hydra composes the config, the engine opens a session around the call.

    A `UserError` anywhere becomes one line on stderr and exit status 1.
    """

    def decorate(main):
        @functools.wraps(main)  # Hydra names the job (logs/<job>/...) after the script defining `main`
        def task(cfg):
            session = None
            try:
                session = Session(cfg, Path(HydraConfig.get().runtime.output_dir), config_name)
                return main(cfg, session)
            except UserError as err:
                logging.getLogger("metalabel").error(f"error: {err}")  # console (stderr) and the run's log
                sys.exit(1)
            finally:
                if session is not None:
                    session.close()

        run = hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base=None)(task)

        @functools.wraps(main)
        def entry():
            _join_process_group()
            return run()

        return entry

    return decorate


def compose(config_name: str, overrides: list[str]):
    """The config a script would get with these command-line overrides, outside a Hydra run (tests, benches)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return hydra_compose(config_name, overrides=overrides)
