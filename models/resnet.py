"""ResNet-12 and ResNet-18 as MeLa uses them (the RFS / MetaOptNet family), with DropBlock.

Each block: 3x (conv3x3 without bias -> BN -> LeakyReLU(0.1)), no activation after the third BN; the shortcut is
conv1x1 + BN where the channels change; add, LeakyReLU, then MaxPool(2) in the first block of a stage.
Stages have 64-160-320-640 channels (x width_mult); global average pooling gives the feature (640-d).
Regularisation after each block: dropout(drop_rate) in stages 1-2; in stages 3-4 the LAST block of the stage
uses DropBlock and any earlier block dropout (the reference's ResNet-18 builds its first block with positional
arguments that switch DropBlock off; ResNet-12 has one block per stage, so stages 3-4 use DropBlock).
Inputs of any size from 16x16 up (84x84 for the ImageNet family, 32x32 in tests).
"""
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import UserError
from engine.settings import POSITIVE_INT, Number, OneOf, setting
from models.registry import ModelSettings, kaiming_init, register_model, scaled

STAGE_CHANNELS = (64, 160, 320, 640)
KEEP_SCHEDULE_STEPS = 40000  # forwards over which DropBlock's keep rate falls from 1 to 1 - drop_rate
DROPBLOCK_MASKS = ("correct", "reference")


def dropblock_mask(seeds: torch.Tensor, size: int, construction: str = "correct") -> torch.Tensor:
    """The keep mask (1 kept, 0 dropped) of a [N, C, H, W] map from its block seeds [N, C, H-size+1, W-size+1].

    A seed at (i, j) drops rows i..i+size-1 and columns j..j+size-1. "correct" drops that whole square for
    every seed. "reference" gives the original code's mask: it lists the S seeds (row-major) and the size^2
    offsets of a square (row-major), tiles the seed list size^2 times and the offset list S times and pairs the
    two row by row, so seed number k meets the offsets k + t*S mod size^2, i.e. exactly the offsets o with
    o = k (mod gcd(S, size^2)). All of them when S shares no factor with size^2; for size 5 and S a multiple of
    5 (not of 25) only one column of 5 pixels; for S a multiple of 25 one pixel. The seed's own entry, padded
    into the square's centre, is dropped as well. Both stay on the device (no host synchronisation).
    """
    if construction == "correct":
        return 1.0 - F.max_pool2d(F.pad(seeds, (size - 1,) * 4), size, stride=1)
    before, after = (size - 1) // 2, size // 2
    dropped = F.pad(seeds, (before, after, before, after))
    rank = (seeds.flatten().long().cumsum(0) - 1).reshape(seeds.shape)  # k, at the seeds' positions
    period = torch.gcd(rank.new_tensor(size**2), seeds.sum().long())
    valid_h, valid_w = seeds.shape[-2:]
    for offset in range(size**2):
        row, col = divmod(offset, size)
        meets = seeds * ((rank - offset) % period == 0)
        window = dropped[:, :, row:row + valid_h, col:col + valid_w]
        window.copy_(torch.maximum(window, meets))
    return 1.0 - dropped


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018) with the reference's linear keep-rate schedule.

    keep = max(1 - drop_rate / 40000 * t, 1 - drop_rate), where t counts this module's forwards. As in the
    reference, EVERY forward advances t, in eval mode too (only training forwards drop anything), except inside
    `dropblock_schedules_paused`. t is a buffer, so it is saved in the state_dict and a resumed run continues the
    schedule. All of it stays on the device: no host synchronisation per forward. `construction` chooses how
    seeds grow into blocks (`dropblock_mask`).
    """

    def __init__(self, drop_rate: float, block_size: int, construction: str = "correct"):
        super().__init__()
        self.drop_rate = drop_rate
        self.block_size = block_size
        self.construction = construction
        self.counting = True
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def keep_rate(self) -> torch.Tensor:
        return (1.0 - self.drop_rate / KEEP_SCHEDULE_STEPS * self.steps).clamp(min=1.0 - self.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.counting:
            self.steps += 1
        if not self.training or self.drop_rate == 0:
            return x
        n, c, h, w = x.shape
        size = min(self.block_size, h, w)  # small maps (tests, digits): blocks cover at most the whole map
        valid_h, valid_w = h - size + 1, w - size + 1
        # Seed rate such that the expected dropped share is 1 - keep once seeds grow into size x size blocks.
        gamma = (1.0 - self.keep_rate()) / size**2 * (h * w) / (valid_h * valid_w)
        seeds = (torch.rand(n, c, valid_h, valid_w, device=x.device) < gamma).to(x.dtype)
        mask = dropblock_mask(seeds, size, self.construction)
        kept = mask.sum(dtype=torch.float32).clamp(min=1.0)  # float32 even for half-precision maps
        return x * mask * (mask.numel() / kept)


@contextmanager
def dropblock_schedules_paused(module: nn.Module):
    """Forwards inside leave the step counter of every DropBlock in `module` as it is.

    For MAXL's virtual forwards: they belong to a step whose real forward already counted, a forward-mode
    (`torch.func.jvp`) pass must not update a buffer in place, and a replayed forward must drop at the same rate.
    """
    blocks = [m for m in module.modules() if isinstance(m, DropBlock)]
    for block in blocks:
        block.counting = False
    try:
        yield
    finally:
        for block in blocks:
            block.counting = True


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, pool: bool, regulariser: nn.Module):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.LeakyReLU(0.1),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.LeakyReLU(0.1),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )
        self.shortcut = (nn.Identity() if in_channels == channels else
                         nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels)))
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.regulariser = regulariser

    def forward(self, x):
        return self.regulariser(self.pool(self.act(self.convs(x) + self.shortcut(x))))


class ResNet(nn.Module):
    """`blocks[s]` blocks in stage s; `feat_dim` = 640 x width_mult."""

    def __init__(self, blocks: tuple[int, ...], width_mult: float = 1.0, drop_rate: float = 0.1,
                 dropblock_size: int = 5, in_channels: int = 3, dropblock: str = "correct"):
        super().__init__()
        layers, channels = [], in_channels
        for stage, (width, n_blocks) in enumerate(zip(STAGE_CHANNELS, blocks)):
            width = scaled(width, width_mult)
            for i in range(n_blocks):
                if stage >= 2 and i == n_blocks - 1:
                    regulariser = DropBlock(drop_rate, dropblock_size, dropblock)
                else:
                    regulariser = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
                layers.append(BasicBlock(channels, width, pool=i == 0, regulariser=regulariser))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feat_dim = channels
        kaiming_init(self, "leaky_relu")

    def forward(self, x):
        if min(x.shape[-2:]) < 16:
            raise UserError(f"the ResNet backbones need images of at least 16x16 pixels, got "
                            f"{x.shape[-2]}x{x.shape[-1]}: resize the dataset's images")
        return self.pool(self.layers(x)).flatten(1)


@dataclass
class ResNetSettings(ModelSettings):
    """ResNet-12 and ResNet-18 (`model=resnet12`, `model=resnet18`)."""

    drop_rate: float = setting(0.1, Number(minimum=0, below=1),
                               "dropout in stages 1-2, DropBlock's final drop rate in stages 3-4")
    dropblock_size: int = setting(5, POSITIVE_INT, "DropBlock's block side")
    dropblock: str = setting("correct", OneOf(DROPBLOCK_MASKS),
                             "correct: whole blocks; reference: the original code's masks (partial blocks)")


register_model("resnet12", ResNetSettings)(partial(ResNet, (1, 1, 1, 1)))
register_model("resnet18", ResNetSettings)(partial(ResNet, (1, 1, 2, 2)))
