"""Hydra entry point of every script: composes and validates the config, opens a `Session`, turns `UserError` into
one line. In a sweep (`-m`) a failed job is recorded in its folder (`error.txt`) and the other jobs still run; the
sweep then lists the failures and exits 1. An interrupted run (SIGTERM/SIGUSR1/SIGINT) exits 128 + the signal."""
import contextlib
import copyreg
import dataclasses
import functools
import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from engine.config import CONFIG_DIR, SCRIPTS, _hydra_view, validate_and_name  # (registers the name resolvers)
from engine.errors import ERROR_FILE, RunInterrupted, UserError
from engine.help import group_options, register_help
from engine.runs import RunLock
from engine.script import Script
from engine.session import Session
from engine.settings import check_directory, closest, declared, defaults
from engine.workspace import workspace_root

log = logging.getLogger("metalabel")

RUN_STAMP = "METALABEL_RUN_STAMP"

if not OmegaConf.has_resolver("env_workspace"):
    OmegaConf.register_new_resolver("env_workspace", lambda: str(workspace_root()))
    # `${flag:${key},_text}`: the text when the key is true, else nothing (run names like the original's).
    OmegaConf.register_new_resolver("flag", lambda value, text: text if value else "")
    # The run directory's time stamp; under torchrun every rank takes rank 0's (see _join_process_group).
    OmegaConf.register_new_resolver("run_stamp", lambda: os.environ.get(RUN_STAMP)
                                    or time.strftime("%Y-%m-%d_%H-%M-%S"), use_cache=True)


def _join_process_group() -> None:
    """Under torchrun: join the process group before Hydra starts, so that every rank agrees on one run
    directory (rank 0's time stamp), and let only rank 0 write Hydra's own files."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or dist.is_initialized():
        return
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    stamp = [time.strftime("%Y-%m-%d_%H-%M-%S")]
    dist.broadcast_object_list(stamp, src=0)
    os.environ[RUN_STAMP] = stamp[0]
    if dist.get_rank() != 0:
        sys.argv.append("hydra.output_subdir=null")


def _record_failure(run_dir: Path, message: str) -> None:
    overrides = " ".join(HydraConfig.get().overrides.task)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).write_text(f"overrides: {overrides}\n{message}\n")


RECORDS = ("config.yaml", "metrics.csv", "summary.json", "results.json")  # what Session and a job write there
_claimed: dict = {}  # the run directory this process claimed (`claim_run_dir`), and whether it created it


def _recorded_name(run_dir: Path) -> str | None:
    """The run name in `run_dir`'s config.yaml ('' when it has none or cannot be read), None without one."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return None
    try:
        return str(OmegaConf.load(path).get("name") or "")
    except Exception:  # unreadable or not a mapping: not this run's
        return ""


def claim_run_dir(config: DictConfig) -> None:
    """Before Hydra creates the run directory, opens its log or writes `.hydra/`: check every setting, then make sure
    the directory is this run's alone. A directory holding another run's records (`hydra.run.dir=` an earlier run's
    folder) is refused; a stamped directory (the default) that another process of this run created in the same
    second is replaced by `<stamp>_2`, `<stamp>_3` ...; a fixed one of a run held by a live process is refused before
    anything is written into it (the same run continuing into its own directory is fine)."""
    HydraConfig.instance().set_config(config)
    if int(os.environ.get("RANK", 0)) > 0:
        return  # rank 0 claims the directory of a torchrun job
    settings, script, choices = _hydra_view(config)
    written = OmegaConf.to_container(config.hydra.run, resolve=False)["dir"]
    run_dir = Path(str(config.hydra.run.dir))  # the default checks every setting first (`checked_name`)
    if "${checked_name:}" not in str(written):
        validate_and_name(settings, script, choices)
    name = str(settings.name)
    if "${run_stamp:}" not in str(written):
        recorded = _recorded_name(run_dir)
        if recorded is not None and recorded != name:
            other = f"run {recorded}" if recorded else "a run whose config.yaml cannot be read"
            raise UserError(f"hydra.run.dir={written} holds the records of {other} ({run_dir / 'config.yaml'}): "
                            f"give hydra.run.dir a folder of its own, or leave it to its default")
        if script.writes_checkpoints:
            RunLock(Path(str(settings.checkpoint_dir)) / name, float(settings.lock_stale_hours)).check_free()
    existed = run_dir.exists()
    check_directory(run_dir, f"hydra.run.dir={run_dir}", "give hydra.run.dir a directory you can write to")
    if "${run_stamp:}" in str(written) and int(os.environ.get("WORLD_SIZE", 1)) == 1:  # torchrun's ranks share it
        base = run_dir
        for attempt in range(2, 1000):
            try:
                run_dir.mkdir(parents=True)
                break
            except FileExistsError:  # another process of this run started in the same second
                run_dir = base.with_name(f"{base.name}_{attempt}")
        with read_write(config.hydra.run), open_dict(config.hydra.run):
            config.hydra.run.dir = str(run_dir)
        existed = False
    _claimed.update(dir=run_dir.absolute(), created=not existed)


def _forget_refused_run_dir() -> None:
    """A run refused before it recorded anything (a data check, a resume mismatch, a held lock) leaves no folder:
    the run directory this process created is removed, with its log."""
    run_dir = _claimed.get("dir")
    if not _claimed.get("created") or run_dir is None or any((run_dir / name).exists() for name in RECORDS[1:]):
        return
    for handler in list(logging.getLogger().handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(run_dir):
            logging.getLogger().removeHandler(handler)
            handler.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        run_dir.parent.rmdir()  # logs/<script>/<name>/ when it held only this


def _exit_on_user_error(check, *args) -> None:
    """Before a run starts: a `UserError` is one line on stderr and exit status 1."""
    try:
        check(*args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1)


class SweepFailures(Callback):
    """At the start of a run: its directory is its own (`claim_run_dir`). At the start of a sweep: the launcher can
    run here. At its end: one line per failed job, exit status 1."""

    def on_run_start(self, config, **kwargs) -> None:
        _exit_on_user_error(claim_run_dir, config)

    def on_multirun_start(self, config, **kwargs) -> None:
        _exit_on_user_error(check_launcher, config.hydra)

    def on_multirun_end(self, config, **kwargs) -> None:
        failed = sorted(Path(config.hydra.sweep.dir).glob(f"*/{ERROR_FILE}"), key=lambda p: p.stat().st_mtime)
        for path in failed:
            overrides, message = path.read_text().split("\n", 1)
            print(f"error: job {path.parent.name} ({overrides.removeprefix('overrides: ')}): "
                  f"{message.strip().splitlines()[0].removeprefix('error: ')}", file=sys.stderr)
        if failed:
            print(f"error: {len(failed)} job(s) of the sweep failed (their folders hold {ERROR_FILE}); "
                  f"fix them and run the sweep again: finished jobs are not run twice", file=sys.stderr)
            raise SystemExit(1)


def check_launcher(hydra_cfg: DictConfig) -> None:
    """A sweep on SLURM needs SLURM's `sbatch`; without it submitit fails with a traceback."""
    target = str(OmegaConf.select(hydra_cfg, "launcher._target_", default=""))
    if not target.endswith("SlurmLauncher") or shutil.which("sbatch"):
        return
    choice = OmegaConf.select(hydra_cfg, "runtime.choices", default={}).get("hydra/launcher") or "slurm"
    raise UserError(f"hydra/launcher={choice} needs SLURM's sbatch on PATH: run on a cluster login node, or drop "
                    f"hydra/launcher=... to run locally")


def register(script: Script) -> None:
    """Give Hydra the script's declared defaults (`<name>_settings`, listed first in config/<name>.yaml) and its
    generated --help, and the run-name resolvers the script (`SCRIPTS`)."""
    if SCRIPTS.get(script.name) is script:
        return
    SCRIPTS[script.name] = script
    ConfigStore.instance().store(name=f"{script.name}_settings", node=defaults(script.settings))
    register_help(script, CONFIG_DIR)


def _closest(name: str, names) -> str:
    close = closest(name, names)
    return f"did you mean {close}? " if close else ""


def check_command_line(script: Script, argv: list[str]) -> None:
    """What Hydra would refuse with a message of many lines, as one `UserError` before Hydra starts: a key the
    script does not declare (without `+`), and a config group option that does not exist (`dataset=digit`). Other
    overrides (`hydra...`, `+key=...`, other groups, nested keys) are left to Hydra and `validate`."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType, ValueType
    from hydra.errors import HydraException

    args, _ = get_args_parser().parse_known_args(argv)
    if args.help or args.hydra_help or args.shell_completion or args.info:
        return
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException:
        return  # a syntax error: Hydra's own message names the place
    keys = declared(script.settings)
    for override in overrides:
        key = override.key_or_group
        root = key.split(".", 1)[0]
        if override.type != OverrideType.CHANGE or override.package is not None or "/" in key or root == "hydra":
            continue
        if root not in keys and root not in script.groups:
            raise UserError(f"{override.input_line}: {root} is not a setting of {script.name}.py: "
                            f"{_closest(root, [*keys, *script.groups])}(python {script.name}.py --help lists the keys)")
        if key not in script.groups:
            continue
        if override.value_type == ValueType.ELEMENT:
            values = [str(override.value())]
        elif override.value_type == ValueType.SIMPLE_CHOICE_SWEEP:
            values = list(override.sweep_string_iterator())
        else:
            continue
        for value in values:
            if not Path(CONFIG_DIR, key, f"{value}.yaml").is_file():
                options = group_options(script, CONFIG_DIR)[key]
                raise UserError(f"{key}={value}: no such {key} option for {script.name}.py: "
                                f"{_closest(value, options)}({key} options: {', '.join(options)})")


def _unpickled(*fields) -> Script:
    script = Script(*fields)
    if script.name not in SCRIPTS:
        register(script)
    return script


# A sweep's launcher may run the job in another process (submitit), which never imports the script: there the
# unpickled script registers itself, as the script's import does here.
copyreg.pickle(Script, lambda s: (_unpickled, tuple(getattr(s, f.name) for f in dataclasses.fields(s))))


def hydra_main(script: Script):
    """Decorate `main(cfg, session)`: Hydra composes the config, the engine validates it and opens a session around
    the call. A `UserError` anywhere becomes one line on stderr and exit status 1."""
    register(script)

    def decorate(main):
        @functools.wraps(main)  # Hydra names the job (logs/<job>/...) after the script defining `main`
        def task(cfg):
            hydra_cfg = HydraConfig.get()
            sweeping = hydra_cfg.mode == RunMode.MULTIRUN
            run_dir = Path(hydra_cfg.runtime.output_dir)
            session = None
            try:
                validate_and_name(cfg, script, dict(hydra_cfg.runtime.choices))
                session = Session(cfg, run_dir, script)
                return main(cfg, session)
            except UserError as err:
                log.error(f"error: {err}")  # console (stderr) and the run's log
                if not sweeping:
                    if session is None or not session.training:
                        _forget_refused_run_dir()
                    sys.exit(1)
                _record_failure(run_dir, f"error: {err}")
            except RunInterrupted as stop:
                log.warning(str(stop))
                sys.exit(stop.exit_status)  # also ends a sweep: the same command continues it
            except Exception:
                if not sweeping:
                    raise
                log.exception("the job failed")
                _record_failure(run_dir, f"error: crashed, traceback in the job's log\n{traceback.format_exc()}")
            finally:
                if session is not None:
                    session.close()

        run = hydra.main(config_path=CONFIG_DIR, config_name=script.name, version_base=None)(task)

        @functools.wraps(main)
        def entry():
            _exit_on_user_error(check_command_line, script, sys.argv[1:])
            _join_process_group()
            return run()

        return entry

    return decorate


def compose(script: Script, overrides: list[str]):
    """The config a script would get with these command-line overrides, validated and named, outside a Hydra run
    (tests, benches)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register(script)
    check_command_line(script, overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = hydra_compose(script.name, overrides=overrides, return_hydra_config=True)
        validate_and_name(cfg, script, dict(cfg.hydra.runtime.choices))
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
