"""VGG-16 with batch norm, as MAXL uses it: 13 conv layers in 5 blocks, 512-d features at 32x32."""
from dataclasses import dataclass

import torch.nn as nn

from engine.errors import UserError
from engine.settings import Boolean, setting
from models.registry import ModelSettings, register_model, scaled

VGG16_BLOCKS = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]  # (channels, 3x3 convs) per block


@dataclass
class VGGSettings(ModelSettings):
    """VGG-16 (`model=vgg16`)."""

    batch_norm: bool = setting(True, Boolean(), "false: the plain VGG-16 (no batch statistics)")


@register_model("vgg16", VGGSettings)
class VGG16(nn.Module):
    """Conv(3x3, pad 1, bias) -> BN -> ReLU repeated, each block ending in MaxPool(2); then flattened.

    At 32x32 input the last map is 1x1, so the feature is 512 x width_mult (no global pooling, as the original).
    `batch_norm=False` gives the plain VGG-16 (whose distributed training equals one process exactly).
    """

    def __init__(self, width_mult: float = 1.0, batch_norm: bool = True, in_channels: int = 3):
        super().__init__()
        blocks, channels = [], in_channels
        for width, convs in VGG16_BLOCKS:
            width = scaled(width, width_mult)
            layers = []
            for _ in range(convs):
                norm = [nn.BatchNorm2d(width)] if batch_norm else []
                layers += [nn.Conv2d(channels, width, 3, padding=1), *norm, nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(2, 2))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.feat_dim = channels

    def forward(self, x):
        if not all(32 <= side < 64 for side in x.shape[-2:]):
            raise UserError(f"VGG-16 takes images of 32x32 pixels (its five poolings must leave a 1x1 map), got "
                            f"{x.shape[-2]}x{x.shape[-1]}: resize the images or use model=resnet12, resnet18 or "
                            f"conv4, which pool globally")
        return self.blocks(x).flatten(1)
