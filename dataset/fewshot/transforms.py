"""Batched image transforms: uint8 HWC images in, normalised float CHW tensors out.

Augmentation (as the original's) is per image with torchvision's v2 transforms, so every image draws its own crop, jitter
and flip: RandomCrop(image size, padding) and RandomHorizontalFlip on the uint8 tensor, then ColorJitter(0.4,
0.4, 0.4) in float (cheaper than jittering uint8, which converts to float and back for each of the three
adjustments). The original flipped after the jitter; a flip commutes with it, so the result is the same.
Without augmentation the conversion to float runs once on the whole batch; rotation and normalisation always do.

Rotation (the x4 rotation task) turns the augmented image by k*90 degrees, k in 0..3. The original forced an
augmenting transform with a vertical instead of a horizontal flip for k = 1, 3 whatever `data_aug` said; a
vertical flip is a 180-degree turn of a mirrored image, so that made half of the 90-degree samples look like
270-degree ones. Here augmentation follows `data_aug` alone and always flips horizontally before turning: a
turned mirror image is still a turn by k*90 degrees of a natural image, so the rotation label stays right.
"""
from dataclasses import dataclass

import numpy as np
import torch

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

    def __call__(self, images: torch.Tensor, rotations: np.ndarray | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """`images` [B, H, W, 3] uint8 -> [B, 3, H, W] float32 (written into `out` if given); `rotations` [B] in
        0..3 turns image b by 90 * k degrees."""
        x = images.permute(0, 3, 1, 2).contiguous()
        out = torch.empty(x.shape, dtype=torch.float32) if out is None else out
        if self.augment:
            augment = self._augmenter(x.shape[-2:])
            torch.stack([augment(image) for image in x], out=out)
        else:
            out.copy_(x).div_(255)
        if rotations is not None:
            rotations = torch.as_tensor(rotations)
            for k in (1, 2, 3):
                turned = rotations == k
                if turned.any():
                    out[turned] = torch.rot90(out[turned], k, dims=(-2, -1))
        # torchvision's normalize, written out so that a run without augmentation never imports torchvision
        mean = torch.as_tensor(self.mean, dtype=out.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=out.dtype).view(-1, 1, 1)
        return out.sub_(mean).div_(std)

    def _augmenter(self, size):
        from torchvision.transforms import v2  # imported when first needed: scripts start faster

        steps = [v2.RandomCrop(tuple(size), padding=self.crop_padding)] if self.crop_padding else []
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        steps += [v2.ToDtype(torch.float32, scale=True), v2.ColorJitter(JITTER, JITTER, JITTER)]
        return v2.Compose(steps)


def transform_from_config(dataset_cfg, augment: bool) -> ImageTransform:
    """The transform a `dataset=` config asks for (keys mean, std, crop_padding, hflip)."""
    return ImageTransform(mean=tuple(float(v) for v in dataset_cfg.mean), std=tuple(float(v) for v in dataset_cfg.std),
                          augment=bool(augment), crop_padding=int(dataset_cfg.crop_padding),
                          hflip=bool(dataset_cfg.hflip))
