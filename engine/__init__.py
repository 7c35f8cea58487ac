"""The shared training engine: Hydra entry point (`hydra_main`), `Session` (device, seeds, logging, loaders,
distributed ranks), the epoch loop with checkpoints and resume (`TrainingJob`, trainer.py), metrics.

Names are imported on first use, so that `engine.errors` and `engine.workspace` stay cheap for command-line tools.
"""

_LAZY = {"hydra_main": "engine.entry", "compose": "engine.entry", "CONFIG_DIR": "engine.config",
         "Script": "engine.script",
         "Session": "engine.session", "TrainingJob": "engine.trainer", "UserError": "engine.errors"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'engine' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = list(_LAZY)
