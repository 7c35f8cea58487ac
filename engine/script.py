"""What a script hands the engine: `Script`. The engine knows no algorithm, dataset or model: what it needs from
a script (the settings it declares, which key is its learning rate) comes from here, and what it needs from a job
(its headline metric, its count of skipped steps) from the `TrainingJob` it is handed."""
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Script:
    """name: the script, and its config `config/<name>.yaml`.
    settings: the dataclass declaring the script's top-level keys (engine/settings.py).
    groups: config group (`dataset`, `model`) -> a function of the chosen option's node giving the dataclass that
        declares that option's keys.
    checks: functions of the composed config run after every key has passed its rule; each raises a `UserError`
        (checks that need another layer: a dataset's files, the labeler's K against n_ways).
    lr_key: the key named when a loss diverges ("lower lr").
    writes_checkpoints: the script trains a run (resume, overwrite and the run lock apply).
    """

    name: str
    settings: type | None = None
    groups: dict[str, Callable] = field(default_factory=dict)
    checks: tuple[Callable, ...] = ()
    lr_key: str | None = None
    writes_checkpoints: bool = True

