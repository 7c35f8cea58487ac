"""Run identity: settings are validated first, then the run's name is derived from them.

A run's name is `<run_prefix>_s<seed>[_<hash>]`: a short stable hash of every other setting that differs from the
script's defaults (for the chosen dataset and model) and could change the result. `neutral` settings (epochs, device,
paths ...) are left out, so `epochs=N+1` extends a run instead of starting another. `name=...` replaces the name.
"""
import hashlib
import json
import sys
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from engine.errors import UserError
from engine.script import Script
from engine.settings import IDENTITY_KEYS, EngineSettings, EpochSettings, neutral_keys, validate

# Config groups whose choice is part of the readable prefix: defaults are taken for the chosen options.
PREFIX_GROUPS = ("dataset", "model")
HASH_LENGTH = 8
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "config")
SCRIPTS: dict[str, Script] = {}  # the scripts this process registered (engine.entry.register), by name


def leaves(cfg, skip=frozenset(), prefix: str = "", strict: bool = True) -> dict:
    """Every leaf of `cfg` as dotted key -> resolved plain value (lists kept whole), leaving out the top-level keys
    in `skip`. A key that cannot be resolved is a UserError naming it (`strict`), else "???" (as a default without
    a value: hier_file's dataset.path)."""
    flat = {}
    for key in cfg.keys() if isinstance(cfg, DictConfig) else []:
        dotted = f"{prefix}{key}"
        if not prefix and key in skip:
            continue
        try:
            value = cfg[key]
        except Exception as exc:  # an interpolation to a missing key, a missing mandatory value
            if not strict:
                flat[dotted] = "???"
                continue
            raise UserError(f"{dotted} cannot be resolved ({type(exc).__name__}: {str(exc).splitlines()[0]}): "
                            f"set it on the command line, e.g. {dotted}=...") from None
        if isinstance(value, DictConfig):
            flat |= leaves(value, skip, dotted + ".", strict)
        elif isinstance(value, ListConfig):
            flat[dotted] = OmegaConf.to_container(value, resolve=True)
        else:
            flat[dotted] = value
    return flat


def settings_hash(current: dict, defaults: dict) -> str:
    """A short hash of the settings that differ from the defaults ('' when none do)."""
    changed = {k: current.get(k) for k in sorted(set(current) | set(defaults)) if current.get(k) != defaults.get(k)}
    if not changed:
        return ""
    text = json.dumps(changed, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


def unnamed_settings(script: Script | None = None) -> frozenset[str]:
    """Top-level keys left out of a run's hash: the neutral ones, and those in the name by themselves. Without a
    script: those of every script (the neutral keys are the engine's own, a test checks it), for tools that read
    runs of any script."""
    neutral = neutral_keys(script.settings) if script else neutral_keys(EngineSettings) | neutral_keys(EpochSettings)
    return neutral | set(IDENTITY_KEYS) | {"hydra"}


@lru_cache(maxsize=32)
def _default_config(script: str, settings: type, choices: tuple) -> DictConfig:
    """The script's config for the chosen group options, composed inside or outside a running Hydra app
    (`settings`: its declarations, part of the cache key)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"{group}={option}" for group, option in choices]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=script, overrides=overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name=script, overrides=overrides)


def _default_leaves(cfg: DictConfig, script: Script, choices: tuple) -> dict:
    """The defaults' settings for the chosen group options, read with this run's neutral values (its workspace,
    data_dir ...), so that a path spelled out or taken from $WORKSPACE never renames a run."""
    defaults = _default_config(script.name, script.settings, choices).copy()
    for key in neutral_keys(script.settings) & set(cfg.keys()) & set(defaults.keys()):
        defaults[key] = cfg[key]
    return leaves(defaults, skip=unnamed_settings(script), strict=False)


def changed_setting(saved_yaml: str, cfg, script: Script) -> tuple[str, object, object] | None:
    """The first setting (key, saved, now) in which a checkpoint's run differs from `cfg`, if any; the neutral
    settings may differ (a continued run may change them)."""
    skip = neutral_keys(script.settings) | {"hydra"}
    saved, current = leaves(OmegaConf.create(saved_yaml), skip=skip), leaves(cfg, skip=skip)
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return (changed[0], saved.get(changed[0]), current.get(changed[0])) if changed else None


def derive_name(cfg: DictConfig, script: Script, choices: dict) -> str:
    """`<run_prefix>_s<seed>[_<hash>]` for a validated config (see the module docstring)."""
    groups = tuple((g, str(choices[g])) for g in PREFIX_GROUPS if choices.get(g))
    digest = settings_hash(leaves(cfg, skip=unnamed_settings(script)), _default_leaves(cfg, script, groups))
    return f"{cfg.run_prefix}_s{cfg.seed}" + (f"_{digest}" if digest else "")


def validate_and_name(cfg: DictConfig, script: Script, choices: dict) -> DictConfig:
    """What every script does first: validate every setting, then fix `name` (derived unless given)."""
    validate(cfg, script)
    if OmegaConf.is_interpolation(cfg, "name"):
        cfg.name = derive_name(cfg, script, choices)
    return cfg


def _hydra_view(root: DictConfig) -> tuple[DictConfig, Script, dict]:
    """The settings without Hydra's own node (whose keys use the name), the script and its group choices."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    settings = OmegaConf.masked_copy(root, [key for key in root if key != "hydra"])
    return settings, SCRIPTS[hydra_cfg.job.config_name], dict(hydra_cfg.runtime.choices)


def _run_name_resolver(*, _root_: DictConfig) -> str:
    """`name: ${run_name:}` in a script's config: the derived name (settings validated by `checked_name`)."""
    settings, script, choices = _hydra_view(_root_)
    return derive_name(settings, script, choices)


def _checked_name_resolver(*, _root_: DictConfig) -> str:
    """`${checked_name:}` in Hydra's run and sweep directories: validates every setting, then gives the run's name
    (derived or given). So a bad setting is reported as one line before Hydra creates any directory; in a sweep
    the job itself records it in the job's folder (named `invalid`) instead."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    settings, script, _ = _hydra_view(_root_)
    try:
        validate(settings, script)
        return str(settings.name)
    except UserError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return "invalid"
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1)


for _name, _resolver in (("run_name", _run_name_resolver), ("checked_name", _checked_name_resolver)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)
