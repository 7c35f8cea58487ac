"""The shared training engine: Hydra entry point, session (device, seeds, logging, loaders), epoch loop."""
import functools
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from engine.errors import UserError
from engine.session import Session
from engine.trainer import TrainingJob
from engine.workspace import workspace_root

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "config")

if not OmegaConf.has_resolver("env_workspace"):
    OmegaConf.register_new_resolver("env_workspace", lambda: str(workspace_root()))


def hydra_main(config_name: str):
    """Decorate `main(cfg, session)`: Hydra composes the config, the engine opens a session around the call.

    A `UserError` anywhere becomes one line on stderr and exit status 1.
    """

    def decorate(main):
        @functools.wraps(main)
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

        return hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base=None)(task)

    return decorate


__all__ = ["hydra_main", "Session", "TrainingJob", "UserError"]
