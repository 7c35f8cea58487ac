"""One registry knows every architecture: `create_model(name, **kwargs)`; a backbone also declares the settings of
its `model=` option (`model.*` keys), which `model_settings` hands to the config check."""
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from engine.errors import UserError
from engine.settings import POSITIVE, Rule, setting

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_BACKBONE_SETTINGS: dict[str, type] = {}  # model= options: name -> the dataclass declaring their keys


def register_model(name: str, settings: type | None = None):
    """Register a factory under `name`; `settings`: it is a `model=` option whose keys that dataclass declares."""
    def add(factory):
        if name in _REGISTRY:
            raise ValueError(f"model {name} registered twice")
        _REGISTRY[name] = factory
        if settings is not None:
            _BACKBONE_SETTINGS[name] = settings
        return factory

    return add


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise UserError(f"unknown model '{name}': choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


class Backbone(Rule):
    """A registered backbone's name (the registry is filled when the model modules are imported)."""

    def describe(self) -> str:
        return f"one of {', '.join(sorted(_BACKBONE_SETTINGS))}"

    def accepts(self, value) -> bool:
        return value in _BACKBONE_SETTINGS


@dataclass
class ModelSettings:
    """Every backbone (`model=`)."""

    name: str = setting("resnet12", Backbone(), "the backbone")
    width_mult: float = setting(1.0, POSITIVE, "scales every layer's channels (1.0: the papers' size)")


def model_settings(node) -> type:
    """The dataclass declaring the keys of the `model=` option `node` (the base keys when its name is unknown)."""
    return _BACKBONE_SETTINGS.get(str(node.get("name")), ModelSettings)


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
