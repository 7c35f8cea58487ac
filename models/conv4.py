"""Conv-4 (`convnet4` in the reference): 4x (conv3x3 64 + BN + ReLU), MaxPool(2) after the first three, then global
average pooling: a 64-d feature (x width_mult) for inputs of 8x8 pixels and up."""
import torch.nn as nn

from models.registry import ModelSettings, kaiming_init, register_model, scaled


# "convnet4": the reference's name for the same network, so its configs (model=convnet4) keep working.
@register_model("convnet4")
@register_model("conv4", ModelSettings)
class Conv4(nn.Module):
    def __init__(self, width_mult: float = 1.0, in_channels: int = 3):
        super().__init__()
        width = scaled(64, width_mult)
        layers, channels = [], in_channels
        for i in range(4):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
            channels = width
        self.layers = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feat_dim = width
        kaiming_init(self, "relu")

    def forward(self, x):
        return self.layers(x)
