"""Settings declared once, next to the code that reads them, and checked before any work starts.

A group of settings is a dataclass of `setting(default, rule, help)` fields; a script's settings are the union of
the dataclasses it inherits from, cross-key rules are the functions in their `relations`. Hydra's defaults, the
docs' key tables and each script's `--help` all come from these declarations.

Our own rules rather than OmegaConf's typed fields: OmegaConf converts values (`lr=1` becomes 1.0, renaming runs,
whose names hash the values) and reports a bad one in many lines; a rule keeps the value as written and gives one
`error:` line naming the key, the value and what the key takes.
"""
import copy
import difflib
import math
import os
from abc import ABC, abstractmethod
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from engine.errors import UserError
from engine.workspace import DEFAULT_WORKSPACE, workspace_root

SHOWN_ITEMS = 4  # list entries quoted in a message


# ---- rules: what a key takes ----------------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def as_text(value) -> str:
    """A value as a user writes it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        items = [as_text(v) for v in value[:SHOWN_ITEMS]] + (["..."] if len(value) > SHOWN_ITEMS else [])
        return f"[{', '.join(items)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {as_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and _reads_as_another_type(value):
        return f"'{value}'"  # a quoted 'true' or '5' on the command line is a string
    return str(value)


def _reads_as_another_type(text: str) -> bool:
    if text.lower() in ("true", "false", "null", ""):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


class Rule(ABC):
    """What a key takes: `describe()` says it in words, `accepts(value)` checks a resolved plain value."""

    @abstractmethod
    def describe(self) -> str:
        """The values the key takes, in words."""

    @abstractmethod
    def accepts(self, value) -> bool:
        """Whether a resolved plain value is one of them."""


@dataclass(frozen=True)
class Integer(Rule):
    minimum: int | None = None

    def describe(self) -> str:
        return "an integer" + ("" if self.minimum is None else f" >= {self.minimum}")

    def accepts(self, value) -> bool:
        return _is_int(value) and (self.minimum is None or value >= self.minimum)


@dataclass(frozen=True)
class Number(Rule):
    minimum: float | None = None  # inclusive
    above: float | None = None    # exclusive lower bound
    below: float | None = None    # exclusive upper bound

    def describe(self) -> str:
        if self.minimum is not None and self.below is not None:
            return f"a number in [{self.minimum:g}, {self.below:g})"
        if self.above is not None and self.below is not None:
            return f"a number in ({self.above:g}, {self.below:g})"
        bounds = [f">= {self.minimum:g}" if self.minimum is not None else "",
                  f"> {self.above:g}" if self.above is not None else "",
                  f"< {self.below:g}" if self.below is not None else ""]
        return " ".join(["a number", *filter(None, bounds)])

    def accepts(self, value) -> bool:
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return number and (self.minimum is None or value >= self.minimum) \
            and (self.above is None or value > self.above) and (self.below is None or value < self.below)


@dataclass(frozen=True)
class Boolean(Rule):
    def describe(self) -> str:
        return "true or false"

    def accepts(self, value) -> bool:
        return isinstance(value, bool)


@dataclass(frozen=True)
class OneOf(Rule):
    choices: tuple

    def describe(self) -> str:
        names = [as_text(choice) for choice in self.choices]
        return names[0] if len(names) == 1 else f"one of {', '.join(names)}"

    def accepts(self, value) -> bool:
        # `type is` keeps 1 from passing for true (and 0 for false)
        return any(type(value) is type(choice) and value == choice for choice in self.choices)


@dataclass(frozen=True)
class Null(Rule):
    meaning: str = ""

    def describe(self) -> str:
        return "null" + (f" ({self.meaning})" if self.meaning else "")

    def accepts(self, value) -> bool:
        return value is None


def is_folder_name(value) -> bool:
    """One folder name: not empty, not `.` or `..`, without a path separator, whitespace or NUL (so that
    `<checkpoint_dir>/<value>` is a folder directly inside checkpoint_dir, never checkpoint_dir itself or a place
    outside it)."""
    separators = {"/", "\\", "\0", os.sep, *([os.altsep] if os.altsep else [])}
    return (isinstance(value, str) and value not in ("", ".", "..")
            and not any(c in separators or c.isspace() for c in value))


@dataclass(frozen=True)
class Text(Rule):
    """A non-empty string; `plain`: one folder name (no '/', whitespace, '.' or '..': it names a directory)."""
    what: str
    plain: bool = False

    def describe(self) -> str:
        return self.what + (" (one folder name: not '.' or '..', without '/', '\\' or whitespace)"
                            if self.plain else "")

    def accepts(self, value) -> bool:
        return isinstance(value, str) and value != "" and (not self.plain or is_folder_name(value))


@dataclass(frozen=True)
class IntegerList(Rule):
    """A list of integers; `comma_text`: also one integer or "17,22" (the original's form of these keys)."""
    minimum: int
    example: str
    comma_text: bool = True

    def describe(self) -> str:
        return f"a list of integers >= {self.minimum}, e.g. {self.example}"

    def accepts(self, value) -> bool:
        if self.comma_text and isinstance(value, str):
            parts = value.replace(" ", "").split(",")
            if not all(part.isdigit() for part in parts):
                return False
            value = [int(part) for part in parts]
        elif self.comma_text and _is_int(value):
            value = [value]
        return isinstance(value, list) and len(value) > 0 and all(Integer(self.minimum).accepts(v) for v in value)


@dataclass(frozen=True)
class NumberList(Rule):
    length: int
    item: Number

    def describe(self) -> str:
        bounds = self.item.describe().removeprefix("a number")
        return f"a list of {self.length} numbers" + (f", each{bounds}" if bounds else "")

    def accepts(self, value) -> bool:
        return isinstance(value, list) and len(value) == self.length and all(self.item.accepts(v) for v in value)


@dataclass(frozen=True)
class AnyOf(Rule):
    options: tuple[Rule, ...]

    def describe(self) -> str:
        words = [option.describe() for option in self.options]
        return ", ".join(words[:-1]) + f" or {words[-1]}"

    def accepts(self, value) -> bool:
        return any(option.accepts(value) for option in self.options)


POSITIVE_INT = Integer(1)
POSITIVE = Number(above=0)
NON_NEGATIVE = Number(minimum=0)
RUN_NAME = Text("a run name", plain=True)
MAX_AUTO_WORKERS = 8  # num_workers=auto: batched augmentation runs at thousands of images/s per core (bench_data)


# ---- declarations -------------------------------------------------------------------------------------------

def setting(default, rule: Rule, help: str = "", *, neutral: bool = False):
    """A declared key. `neutral`: the key does not change a run's result (device, paths, epochs ...): it is left out
    of the run's name and may differ when a run is continued."""
    meta = {"rule": rule, "help": help, "neutral": neutral}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Declared:
    key: str
    default: object
    rule: Rule
    help: str
    neutral: bool
    owner: type  # the dataclass that declares it


def declared(schema: type) -> dict[str, Declared]:
    """key -> its declaration, for every field of `schema` (a dataclass, with those it inherits)."""
    found = {}
    for f in fields(schema):
        owner = next(k for k in reversed(schema.__mro__) if f.name in getattr(k, "__annotations__", {}))
        default = f.default_factory() if f.default is MISSING else f.default
        found[f.name] = Declared(f.name, default, f.metadata["rule"], f.metadata["help"], f.metadata["neutral"],
                                 owner)
    return found


def defaults(schema: type) -> dict:
    return {key: d.default for key, d in declared(schema).items()}


def neutral_keys(schema: type) -> frozenset[str]:
    return frozenset(key for key, d in declared(schema).items() if d.neutral)


def relations(schema: type) -> list:
    """The cross-key checks of `schema` and of the dataclasses it inherits from (each once)."""
    checks = (check for klass in reversed(schema.__mro__) for check in vars(klass).get("relations", ()))
    return list(dict.fromkeys(checks))


def _resume_or_overwrite(cfg) -> str | None:
    if cfg.overwrite and str(cfg.resume).lower() == "true":
        return ("resume=true and overwrite=true contradict each other: overwrite=true starts the run again, "
                "resume=true continues it; keep one")
    return None


@dataclass
class EngineSettings:
    """Keys every script has: the run, its place, and how it runs."""

    seed: int = setting(0, Integer(0), "seeds python, numpy, torch and the data-loader workers")
    device: str = setting("auto", OneOf(("auto", "cpu", "cuda")), "auto: CUDA when present", neutral=True)
    progress: bool = setting(True, Boolean(), "tqdm progress bars", neutral=True)
    resume: object = setting("auto", OneOf(("auto", True, False)),
                             "auto: continue the run `name` if it has a checkpoint, else start; true: must "
                             "continue; false: must start", neutral=True)
    overwrite: bool = setting(False, Boolean(), "start the run `name` again: its checkpoints are removed first",
                              neutral=True)
    checkpoint_every: float = setting(0, Number(minimum=0), "minutes between checkpoints inside an epoch (0: at "
                                      "epoch ends, and on SIGTERM/SIGUSR1/SIGINT)", neutral=True)
    lock_stale_hours: float = setting(24, POSITIVE, "a run lock held by another host for longer than this is "
                                      "taken over (same host: dead pid)", neutral=True)
    # The data loader's keys (engine/session.py Session.loader).
    num_workers: object = setting("auto", AnyOf((OneOf(("auto",)), Integer(0))),
                                  "data-loader worker processes (0: load in the main process; auto: 0 when the "
                                  "images are on the training device, else the usable cores / processes on this "
                                  f"node, minus one for the main process, between 1 and {MAX_AUTO_WORKERS})",
                                  neutral=True)
    data_device: str = setting("auto", OneOf(("auto", "cpu", "cuda")),
                               "where the training images are kept, gathered and augmented. auto: on the CUDA GPU "
                               "the model trains on when they fit in data_device_memory_share of its free memory "
                               "and num_workers is auto or 0, else on the CPU (loader workers, pinned batches); "
                               "cuda: on the GPU in any case (no workers)",
                               neutral=True)
    data_device_memory_share: float = setting(0.5, Number(above=0, below=1),
                                              "data_device=auto: the share of the GPU's free memory the uint8 "
                                              "images of one loader may take", neutral=True)
    threads: object = setting("auto", AnyOf((OneOf(("auto",)), POSITIVE_INT)),
                              "torch threads per process (auto: $OMP_NUM_THREADS if set, else the usable cores / "
                              "processes on this node)", neutral=True)
    channels_last: bool = setting(True, Boolean(), "NHWC convolutions: faster with cuDNN and oneDNN, same results "
                                  "to float tolerance")
    precision: str = setting("auto", OneOf(("auto", "fp32", "bf16")),
                             "auto: bf16 autocast on CUDA GPUs that support it, fp32 on CPU")
    compile: object = setting("auto", OneOf(("auto", True, False)), "torch.compile the trained model (auto: on "
                              "CUDA only)", neutral=True)
    workspace: str = setting("${env_workspace:}", Text("a directory"), "$WORKSPACE, or ./workspace when unset",
                             neutral=True)
    data_dir: str = setting("${workspace}/metaL_data", Text("a directory"), "where the datasets are read from",
                            neutral=True)
    checkpoint_dir: str = setting("???", Text("a directory"), "checkpoints go to <checkpoint_dir>/<name>/",
                                  neutral=True)
    run_prefix: str = setting("???", RUN_NAME, "the readable part of the derived run name")
    name: str = setting("${run_name:}", RUN_NAME, "<run_prefix>_s<seed>[_<hash of the other non-default "
                        "settings>]; a string replaces it")

    relations: ClassVar = (_resume_or_overwrite,)


@dataclass
class EpochSettings:
    """A training script's length."""

    epochs: int = setting(200, POSITIVE_INT, "training epochs (a larger value extends a finished run)",
                          neutral=True)


@dataclass
class BatchSettings:
    """A training script that draws batches of images."""

    batch_size: int = setting(100, POSITIVE_INT, "images per optimiser step, over all processes")


NAME_KEYS = ("run_prefix", "name")  # checked last: the run's directories are named after them
IDENTITY_KEYS = ("seed", *NAME_KEYS)  # in the run's name by themselves, not through the hash


# ---- validate -----------------------------------------------------------------------------------------------

def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _entries(node, prefix: str = ""):
    """(dotted key, parent, key) of every entry under `node`, without resolving any interpolation."""
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        if not prefix and key == "hydra":
            continue
        dotted = f"{prefix}{key}"
        yield dotted, node, key
        if not (OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key)):
            child = node[key]
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _entries(child, dotted + ".")


def _group_of(cfg: DictConfig, dotted: str, groups) -> str:
    """' for dataset=<name>' after a key of a config group; '' after a top-level key."""
    group = dotted.split(".", 1)[0]
    if group in groups and "." in dotted and not OmegaConf.is_missing(cfg[group], "name"):
        return f" for {group}={cfg[group].name}"
    return ""


def _check_complete(cfg: DictConfig, groups) -> None:
    """No missing mandatory value, then no interpolation that cannot be resolved (`name` is derived later)."""
    entries = list(_entries(cfg))
    for dotted, parent, key in entries:
        if OmegaConf.is_missing(parent, key):
            raise UserError(f"{dotted} is required{_group_of(cfg, dotted, groups)}: give {dotted}=...")
    for dotted, parent, key in entries:
        if dotted == "name" or not OmegaConf.is_interpolation(parent, key):
            continue
        try:
            parent[key]
        except (InterpolationResolutionError, MissingMandatoryValue) as exc:
            written = OmegaConf.to_container(parent, resolve=False)[key]
            reason = str(exc).splitlines()[0]
            raise UserError(f"{dotted}={written} cannot be resolved ({reason}): give {dotted} a value") from None


def _check_value(node: DictConfig, key: str, rule: Rule, dotted: str) -> None:
    value = _plain(node[key])
    if not rule.accepts(value):
        raise UserError(f"{dotted}={as_text(value)}: {dotted} must be {rule.describe()}")


def closest(name: str, names) -> str | None:
    """The one of `names` nearest to `name` (ignoring case), if one is near."""
    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1)
    return by_lower[close[0]] if close else None


def validate(cfg: DictConfig, script) -> None:
    """Raise a `UserError` for the first bad setting of a composed config (resolved or not); `script` is the
    `engine.script.Script` the config is for."""
    groups = script.groups
    # The groups first: their function may refuse an option (a dataset the script cannot read), and a top-level
    # key may interpolate one of their keys (primary_level: ${dataset.primary_level}).
    group_schemas = {group: declaration(cfg[group]) for group, declaration in groups.items() if group in cfg}
    _check_complete(cfg, groups)
    for group, schema in group_schemas.items():
        node = cfg[group]
        for key, d in declared(schema).items():
            if key in node.keys():
                _check_value(node, key, d.rule, f"{group}.{key}")
    keys = declared(script.settings)
    for key in cfg.keys():
        if key != "hydra" and key not in keys and key not in groups:
            close = closest(key, keys)
            hint = f": did you mean {close}?" if close else f": see python {script.name}.py --help"
            raise UserError(f"{key} is not a setting of {script.name}.py{hint}")
    for key, d in keys.items():
        if key not in NAME_KEYS and key in cfg.keys():
            _check_value(cfg, key, d.rule, key)
    for check in relations(script.settings):
        if message := check(cfg):
            raise UserError(message)
    for key in NAME_KEYS:
        if key != "name" or not OmegaConf.is_interpolation(cfg, key):  # else derived from the other settings
            _check_value(cfg, key, keys[key].rule, key)
    given = not OmegaConf.is_interpolation(cfg, "workspace")
    check_workspace(Path(cfg.workspace) if given else None, writable=script.writes_checkpoints)
    if script.writes_checkpoints:
        check_directory(cfg.checkpoint_dir, f"checkpoint_dir={cfg.checkpoint_dir}",
                        "give checkpoint_dir= a directory you can write to")
    for check in script.checks:
        check(cfg)


def check_workspace(root: Path | None = None, writable: bool = True) -> None:
    """The workspace (data and checkpoints) must be a directory, or creatable as one; `writable`: one this process
    can write to. `root`: a `workspace=` given on the command line; None: $WORKSPACE (or its default)."""
    if root is None:
        root = workspace_root()
        named = f"WORKSPACE={os.environ['WORKSPACE']}" if os.environ.get("WORKSPACE") else \
            f"the default workspace {DEFAULT_WORKSPACE} (WORKSPACE is unset)"
        fix = "set WORKSPACE to a directory you can write to"
    else:
        named, fix = f"workspace={root}", "give workspace= a directory you can write to"
    check_directory(root, named, fix, writable)


def check_directory(root, named: str, fix: str, writable: bool = True) -> None:
    """`root` is a directory, or can be created as one (`writable`: one this process can write to): not under a
    regular file, not under /proc or /sys (which refuse new folders whoever asks)."""
    root = Path(root).expanduser().absolute()
    existing = next(path for path in (root, *root.parents) if path.exists())
    if not existing.is_dir():
        where = "is a file" if existing == root else f"is inside {existing}, which is a file"
        raise UserError(f"{named} {where}, not a directory: {fix}")
    special = next((p for p in ("/proc", "/sys") if existing.is_relative_to(p)), None)
    if writable and (special or not os.access(existing, os.W_OK | os.X_OK)):
        where = "is not writable" if existing == root else f"cannot be created: {existing} is not writable"
        raise UserError(f"{named} {where}: {fix}")

