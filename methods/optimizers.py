"""The optimisers and learning-rate schedules of the MeLa training steps, from their config keys."""
from dataclasses import dataclass

import torch

from engine.settings import NON_NEGATIVE, POSITIVE, Boolean, IntegerList, Number, setting


@dataclass
class ScheduleSettings:
    """The optimiser's rate and its MultiStepLR schedule."""

    learning_rate: float = setting(0.05, POSITIVE, "the optimiser's learning rate")
    lr_decay_epochs: list = setting([17, 22], IntegerList(0, "[17,22]"), "MultiStepLR milestones (also '17,22' or "
                                    "one integer); validation starts at the first")
    lr_decay_rate: float = setting(0.1, POSITIVE, "MultiStepLR's factor")
    weight_decay: float = setting(5e-4, NON_NEGATIVE, "L2 weight decay")


@dataclass
class SGDSettings(ScheduleSettings):
    """SGD with momentum, or Adam."""

    SGD: bool = setting(True, Boolean(), "false: Adam(learning_rate, weight_decay)")
    momentum: float = setting(0.9, Number(minimum=0, below=1), "SGD's momentum")


def int_list(value) -> list[int]:
    """The original's list keys came as strings ("17,22"); accept those, a number, or a list."""
    if isinstance(value, str):
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    if isinstance(value, (int, float)):
        return [int(value)]
    return [int(v) for v in value]


def optimizer(cfg, params) -> torch.optim.Optimizer:
    if cfg.SGD:
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def scheduler(cfg, opt) -> torch.optim.lr_scheduler.MultiStepLR:
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=int_list(cfg.lr_decay_epochs),
                                                gamma=cfg.lr_decay_rate)
