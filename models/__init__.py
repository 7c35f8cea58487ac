"""One registry knows every architecture: `create_model(name, **kwargs)`."""
from typing import Callable

import torch.nn as nn

from engine.errors import UserError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def add(factory):
        if name in _REGISTRY:
            raise ValueError(f"model {name} registered twice")
        _REGISTRY[name] = factory
        return factory

    return add


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise UserError(f"unknown model '{name}': choose one of {', '.join(model_names())}")
    return _REGISTRY[name](**kwargs)


def scaled(channels: int, width_mult: float) -> int:
    """Channels of a layer after `model.width_mult` (tests use small widths; 1.0 is the papers' size)."""
    return max(1, int(round(channels * width_mult)))


def kaiming_init(module: nn.Module, nonlinearity: str) -> None:
    """Kaiming-normal (fan-out) convolutions, batch norm weight 1 and bias 0: the MeLa backbones' init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=nonlinearity)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# Importing the modules fills the registry.
from models import vgg, maxl_nets, resnet, conv4, resfc  # noqa: E402,F401
