"""Every setting checked before any work starts: a bad value is a `UserError` naming the key, the value and what
the key takes.

The rules are tables: `RULES` (a top-level key of any script -> its type and range or choices), `MODEL_RULES` and
`DATASET_RULES` (keys of the `model=` and `dataset=` groups). A key has the same meaning in every script that has
it, so one table serves them all; a rule applies where its key exists. `validate(cfg, script)` works on the
composed, unresolved config: first the dataset must suit the script, then a missing mandatory value (`???`) or an
interpolation that cannot be resolved is reported by its key, then every value meets its rule, then the checks
across keys (`RELATIONS`), then the run's name and the workspace. docs/configuration.md lists the rules.

Checks that need the data (a split's class and image counts) are `check_split_fits`, called when an evaluator is
built; `check_launcher` checks a sweep's launcher when the sweep starts.
"""
import math
import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from dataset.fewshot.layouts import SPLITS
from dataset.fewshot.tasks import DEFAULT_RANDOM_TASKS
from dataset.hierarchical import AUTO
from engine.errors import UserError
from engine.workspace import DEFAULT_WORKSPACE, workspace_root
from methods.maxl import METHODS
from methods.meta_ls import POSITIVE_PAIRS
from models.resnet import DROPBLOCK_MASKS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
# The dataset view each script reads (`supports` in config/dataset/*.yaml): MAXL's label hierarchy, or MeLa's
# few-shot splits.
DATASET_VIEW = {"maxl_train": "maxl", "learn_meta_repr": "mela", "learn_labeler": "mela", "fine_tune": "mela",
                "meta_eval": "mela", "sup_baseline": "mela"}
READ_ONLY_SCRIPTS = ("meta_eval",)  # reads checkpoints from the workspace, writes only its run directory
SHOWN_ITEMS = 4  # list entries quoted in a message


# ---- value rules ---------------------------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _text(value) -> str:
    """A value as a user writes it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        items = [_text(v) for v in value[:SHOWN_ITEMS]] + (["..."] if len(value) > SHOWN_ITEMS else [])
        return f"[{', '.join(items)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_text(v)}" for k, v in value.items()) + "}"
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
        bounds = [f">= {self.minimum:g}" if self.minimum is not None else "",
                  f"> {self.above:g}" if self.above is not None else "",
                  f"< {self.below:g}" if self.below is not None else ""]
        return " ".join(["a number", *filter(None, bounds)])

    def accepts(self, value) -> bool:
        return _is_number(value) and (self.minimum is None or value >= self.minimum) \
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
        names = [_text(choice) for choice in self.choices]
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


@dataclass(frozen=True)
class Text(Rule):
    """A non-empty string; `plain`: without '/' or whitespace (it names a directory)."""
    what: str
    plain: bool = False

    def describe(self) -> str:
        return self.what + (" (a non-empty string without '/' or whitespace)" if self.plain else "")

    def accepts(self, value) -> bool:
        if not isinstance(value, str) or not value:
            return False
        return not (self.plain and ("/" in value or any(c.isspace() for c in value)))


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


def _options(group: str) -> tuple[str, ...]:
    return tuple(sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml")))


POSITIVE_INT = Integer(1)
PRIMARY_LEVEL = AnyOf((OneOf((AUTO,)), POSITIVE_INT))
AUXILIARY_LEVEL = AnyOf((OneOf((AUTO,)), Null("primary task only"), POSITIVE_INT))
POSITIVE = Number(above=0)
NON_NEGATIVE = Number(minimum=0)
RUN_NAME = Text("a run name", plain=True)
CHECKPOINT = AnyOf((Null("not set"), Text("the run name or .pt path of a checkpoint")))

# Top-level keys of every script (engine.yaml, then the scripts' own keys).
RULES: dict[str, Rule] = {
    # engine
    "seed": Integer(0),
    "device": OneOf(("auto", "cpu", "cuda")),
    "progress": Boolean(),
    "resume": OneOf(("auto", True, False)),
    "overwrite": Boolean(),
    "checkpoint_every": Number(minimum=0),
    "lock_stale_hours": POSITIVE,
    "num_workers": Integer(0),
    "threads": AnyOf((OneOf(("auto",)), POSITIVE_INT)),
    "channels_last": Boolean(),
    "precision": OneOf(("auto", "fp32", "bf16")),
    "compile": OneOf(("auto", True, False)),
    "workspace": Text("a directory"),
    "data_dir": Text("a directory"),
    "checkpoint_dir": Text("a directory"),
    # maxl_train
    "method": OneOf(METHODS),
    "primary_level": PRIMARY_LEVEL,
    "auxiliary_level": AUXILIARY_LEVEL,
    "psi": AnyOf((Null("derived from the hierarchy"), POSITIVE_INT,
                  IntegerList(1, "[5,5,...] (one count per primary class)", comma_text=False))),
    "lr": POSITIVE,
    "lr_step": POSITIVE_INT,
    "lr_gamma": POSITIVE,
    "gen_lr": POSITIVE,
    "gen_weight_decay": NON_NEGATIVE,
    "entropy_weight": NON_NEGATIVE,
    "focal_gamma": NON_NEGATIVE,
    "cossim_every": POSITIVE_INT,
    "fd_epsilon": POSITIVE,
    # shared by the training scripts
    "epochs": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    # MeLa scripts
    "trial": AnyOf((Integer(), Text("a name", plain=True))),
    "pretrained_model": CHECKPOINT,
    "pretrained_labeler": CHECKPOINT,
    "pretrained_centroids": AnyOf((Null("cluster the features"), Text("a centroids file"))),
    "split": OneOf(tuple(SPLITS)),
    "n_ways": POSITIVE_INT,
    "n_shots": POSITIVE_INT,
    "n_queries": POSITIVE_INT,
    "no_replacement": Boolean(),
    "fixed_db": Boolean(),
    "train_db_size": AnyOf((Null(f"the whole partition, or {DEFAULT_RANDOM_TASKS} random tasks"), POSITIVE_INT)),
    "tasks_per_step": POSITIVE_INT,
    "data_aug": Boolean(),
    "rotate_aug": Boolean(),
    "sup_data_aug": Boolean(),
    "sup_rotate_aug": Boolean(),
    "K": POSITIVE_INT,
    "std_factor": NON_NEGATIVE,
    "lam": POSITIVE,
    "extra_reg": Boolean(),
    "positive_pairs": OneOf(POSITIVE_PAIRS),
    "SGD": Boolean(),
    "momentum": Number(minimum=0, below=1),
    "learning_rate": POSITIVE,
    "lr_decay_epochs": IntegerList(0, "[17,22]"),
    "lr_decay_rate": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "val_n_ways": POSITIVE_INT,
    "val_n_shots": IntegerList(1, "[1,5]"),
    "test_db_size": POSITIVE_INT,
    "test_C": POSITIVE,
    "use_bias": Boolean(),
    "is_norm": Boolean(),
}
# Checked after every other key: the readable part of the run name is made of them.
NAME_RULES: dict[str, Rule] = {
    "run_prefix": RUN_NAME,
    "name": RUN_NAME,  # unless it is derived from the settings (the default)
}
MODEL_RULES: dict[str, Rule] = {
    "model.name": OneOf(_options("model")),
    "model.width_mult": POSITIVE,
    "model.drop_rate": Number(minimum=0, below=1),
    "model.dropblock_size": POSITIVE_INT,
    "model.dropblock": OneOf(DROPBLOCK_MASKS),
    "model.batch_norm": Boolean(),
}
# The keys every dataset config may have; a dataset's own keys are checked by its reader.
DATASET_RULES: dict[str, Rule] = {
    "dataset.primary_level": PRIMARY_LEVEL,
    "dataset.auxiliary_level": AUXILIARY_LEVEL,
    "dataset.image_size": POSITIVE_INT,
    "dataset.mean": NumberList(3, Number()),
    "dataset.std": NumberList(3, POSITIVE),
    "dataset.crop_padding": Integer(0),
    "dataset.hflip": Boolean(),
}


def _positive_multiple_of_ways(cfg) -> str | None:
    K, n_ways = cfg.K, cfg.n_ways
    if K % n_ways:
        nearest = max(n_ways, round(K / n_ways) * n_ways)
        return f"K={K}: K must be a positive multiple of n_ways={n_ways} (e.g. K={nearest})"
    return None


def _resume_or_overwrite(cfg) -> str | None:
    if cfg.overwrite and str(cfg.resume).lower() == "true":
        return ("resume=true and overwrite=true contradict each other: overwrite=true starts the run again, "
                "resume=true continues it; keep one")
    return None


# Checks across keys, run once every key has passed its rule: (keys they read, check -> message or None).
RELATIONS = [
    (("K", "n_ways"), _positive_multiple_of_ways),
    (("resume", "overwrite"), _resume_or_overwrite),
]


# ---- validate -----------------------------------------------------------------------------------------------

def dataset_names(view: str) -> list[str]:
    """The `dataset=` choices a script reading `view` (maxl or mela) takes."""
    return [name for name in _options("dataset")
            if view in (OmegaConf.load(CONFIG_DIR / "dataset" / f"{name}.yaml").get("supports") or [])]


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _check_dataset_view(cfg: DictConfig, script: str) -> None:
    dataset = cfg.get("dataset")
    if dataset is None or OmegaConf.is_missing(dataset, "supports") or OmegaConf.is_missing(dataset, "name"):
        return
    view = DATASET_VIEW[script]
    if view in (dataset.supports or []):
        return
    kind = ("a few-shot dataset without a label hierarchy" if view == "maxl"
            else "a dataset with a label hierarchy (for maxl_train.py), without few-shot splits")
    names = dataset_names(view)
    raise UserError(f"dataset={dataset.name} is {kind}: {script}.py takes dataset={', '.join(names[:-1])} "
                    f"or {names[-1]}")


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


def _group_of(cfg: DictConfig, dotted: str) -> str:
    """' for dataset=<name>' after a key of a config group; '' after a top-level key."""
    group = dotted.split(".", 1)[0]
    if group in ("dataset", "model") and "." in dotted and not OmegaConf.is_missing(cfg[group], "name"):
        return f" for {group}={cfg[group].name}"
    return ""


def _check_complete(cfg: DictConfig) -> None:
    """No missing mandatory value, then no interpolation that cannot be resolved (`name` is derived later)."""
    entries = list(_entries(cfg))
    for dotted, parent, key in entries:
        if OmegaConf.is_missing(parent, key):
            raise UserError(f"{dotted} is required{_group_of(cfg, dotted)}: give {dotted}=...")
    for dotted, parent, key in entries:
        if dotted == "name" or not OmegaConf.is_interpolation(parent, key):
            continue
        try:
            parent[key]
        except (InterpolationResolutionError, MissingMandatoryValue) as exc:
            written = OmegaConf.to_container(parent, resolve=False)[key]
            reason = str(exc).splitlines()[0]
            raise UserError(f"{dotted}={written} cannot be resolved ({reason}): give {dotted} a value") from None


def _check_rules(cfg: DictConfig, rules: dict[str, Rule]) -> None:
    for key, rule in rules.items():
        *path, last = key.split(".")
        parent = OmegaConf.select(cfg, ".".join(path)) if path else cfg
        if not isinstance(parent, DictConfig) or last not in parent.keys():
            continue  # not a key of this script or this group option
        if key == "name" and OmegaConf.is_interpolation(cfg, key):
            continue  # derived from the other settings
        value = _plain(parent[last])
        if not rule.accepts(value):
            raise UserError(f"{key}={_text(value)}: {key} must be {rule.describe()}")


def validate(cfg: DictConfig, script: str) -> None:
    """Raise a `UserError` for the first bad setting of `script`'s composed config (resolved or not)."""
    if script not in DATASET_VIEW:
        raise ValueError(f"unknown script {script}")
    _check_dataset_view(cfg, script)
    _check_complete(cfg)
    # The groups first: a top-level key may interpolate one of theirs (primary_level: ${dataset.primary_level}).
    for rules in (DATASET_RULES, MODEL_RULES, RULES):
        _check_rules(cfg, rules)
    for keys, check in RELATIONS:
        if all(key in cfg.keys() for key in keys) and (message := check(cfg)):
            raise UserError(message)
    _check_rules(cfg, NAME_RULES)
    if "workspace" in cfg.keys():
        given = not OmegaConf.is_interpolation(cfg, "workspace")
        check_workspace(Path(cfg.workspace) if given else None, writable=script not in READ_ONLY_SCRIPTS)
    # The dataset's own files and subset keys (a hier_file's `auto` levels get their values here)
    if DATASET_VIEW[script] == "maxl":
        from dataset.hierarchical import check_config

        check_config(cfg)
    else:
        from dataset.fewshot.sources import check_config

        check_config(cfg.dataset)


# ---- the environment ----------------------------------------------------------------------------------------

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
    root = Path(root).expanduser().absolute()
    existing = next(path for path in (root, *root.parents) if path.exists())
    if not existing.is_dir():
        where = "is a file" if existing == root else f"is inside {existing}, which is a file"
        raise UserError(f"{named} {where}, not a directory: {fix}")
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        where = "is not writable" if existing == root else f"cannot be created: {existing} is not writable"
        raise UserError(f"{named} {where}: {fix}")


def check_launcher(hydra_cfg: DictConfig) -> None:
    """A sweep on SLURM needs SLURM's `sbatch`; without it submitit fails with a traceback."""
    target = str(OmegaConf.select(hydra_cfg, "launcher._target_", default=""))
    if not target.endswith("SlurmLauncher") or shutil.which("sbatch"):
        return
    choice = OmegaConf.select(hydra_cfg, "runtime.choices", default={}).get("hydra/launcher") or "slurm"
    raise UserError(f"hydra/launcher={choice} needs SLURM's sbatch on PATH: run on a cluster login node, or drop "
                    f"hydra/launcher=... to run locally")


# ---- checks against the data ----------------------------------------------------------------------------------

def check_split_fits(subsets, split: str, ways: tuple[str, int], shots: tuple[str, list[int]],
                     n_queries: int) -> None:
    """Every sub-dataset of `split` has the classes and images per class that its evaluation tasks draw.
    `ways`, `shots`: (config key, value), so that the message names the key the user sets."""
    (ways_key, n_ways), (shots_key, shot_counts) = ways, shots
    for sub in subsets:
        classes, counts = np.unique(np.asarray(sub.flat.labels), return_counts=True)
        where = f"the {split} split of {sub.name}"
        if n_ways > len(classes):
            raise UserError(f"{ways_key}={n_ways} but {where} has only {len(classes)} classes: lower {ways_key} to "
                            f"at most {len(classes)}")
        smallest, needed = int(np.argmin(counts)), max(shot_counts) + n_queries
        if needed > counts[smallest]:
            raise UserError(f"{shots_key}={max(shot_counts)} with n_queries={n_queries} takes {needed} images per "
                            f"class but class {classes[smallest]} of {where} has {counts[smallest]}: lower "
                            f"{shots_key} or n_queries")
