"""Batched image transforms: uint8 HWC images in, normalised float CHW tensors out.

Augmentation (dataset/augment.py) is the original's per image, drawn for the whole batch at once: RandomCrop(image
size, padding) and horizontal flip, then ColorJitter(0.4, 0.4, 0.4) in float (the original flipped after the
jitter; the two commute). Rotation (the x4 rotation task) turns the augmented image by k*90 degrees, k in 0..3.
The original forced an augmenting transform with a vertical flip for k = 1, 3 whatever `data_aug` said: a vertical
flip is a 180-degree turn of a mirror image, so half of its 90-degree samples looked like 270-degree ones. Here
augmentation follows `data_aug` alone and flips horizontally before turning, so the rotation label stays right.
"""
from dataclasses import dataclass

import numpy as np
import torch

from dataset.augment import Augmentation, to_normalised
from engine.settings import Boolean, setting

JITTER = 0.4  # brightness, contrast and saturation strength of the original's ColorJitter


@dataclass
class AugmentSettings:
    """Augmentation of the training images."""

    data_aug: bool = setting(True, Boolean(), "RandomCrop(pad dataset.crop_padding) + ColorJitter(0.4) + "
                             "horizontal flip (dataset.hflip)")
    rotate_aug: bool = setting(False, Boolean(), "x4 rotations as extra classes")


@dataclass(frozen=True)
class ImageTransform:
    """Normalise with `mean`/`std` (per channel, on [0, 1] values); optionally augment each image first."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: bool = False
    crop_padding: int = 8
    hflip: bool = True

    def __call__(self, images: torch.Tensor, rotations: np.ndarray | None = None, out: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """`images` [B, H, W, 3] uint8 -> [B, 3, H, W] float32 (written into `out` if given), on the images'
        device; `rotations` [B] in 0..3 turns image b by 90 * k degrees. Augmentation draws from `generator`."""
        augmentation = Augmentation(self.crop_padding, self.hflip, JITTER) if self.augment else None
        # normalised before the turns: per channel, so the same values
        x = to_normalised(images, self.mean, self.std, augmentation, generator, out)
        if rotations is not None:
            rotations = torch.as_tensor(rotations, device=x.device)
            for k in (1, 2, 3):
                turned = rotations == k
                if turned.any():
                    x[turned] = torch.rot90(x[turned], k, dims=(-2, -1))
        return x


def transform_from_config(dataset_cfg, augment: bool) -> ImageTransform:
    """The transform a `dataset=` config asks for (keys mean, std, crop_padding, hflip)."""
    return ImageTransform(mean=tuple(float(v) for v in dataset_cfg.mean), std=tuple(float(v) for v in dataset_cfg.std),
                          augment=bool(augment), crop_padding=int(dataset_cfg.crop_padding),
                          hflip=bool(dataset_cfg.hflip))
