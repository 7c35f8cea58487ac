"""The optimisers and learning-rate schedules of the MeLa training steps, from their config keys."""
import torch


def int_list(value) -> list[int]:
    """The original's list keys came as strings ("17,22"); accept those, a number, or a list."""
    if isinstance(value, str):
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    if isinstance(value, (int, float)):
        return [int(value)]
    return [int(v) for v in value]


def optimizer(cfg, params) -> torch.optim.Optimizer:
    """SGD(learning_rate, momentum, weight_decay), or with SGD=false Adam(learning_rate, weight_decay)."""
    if cfg.SGD:
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def scheduler(cfg, opt) -> torch.optim.lr_scheduler.MultiStepLR:
    """MultiStepLR: the learning rate times lr_decay_rate at each epoch of lr_decay_epochs."""
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=int_list(cfg.lr_decay_epochs),
                                                gamma=cfg.lr_decay_rate)
