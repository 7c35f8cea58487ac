"""Training augmentation of a whole batch at once, on the device the images are on; every image draws its own.

RandomCrop(size, padding, zero fill) and horizontal flip are one gather of image rows from the zero-padded uint8
batch [B, H, W, C] and its mirror image (torchvision's crop then flip: a flipped crop is a crop of the mirrored
padded image). ColorJitter(jitter, jitter, jitter) runs in float, each image with its own brightness, contrast and
saturation factors (uniform in [1 - jitter, 1 + jitter]) in its own random order (no hue). Each is torchvision
v2's blend `clamp(f * x + (1 - f) * other, 0, 1)` with other = 0 (brightness), the mean of the image's grayscale
(contrast) or the grayscale (saturation), so one step blends every image with its own `other`.
The parameters are drawn on the CPU from `generator` (the engine seeds it per batch), in a fixed order for the
whole batch: the same batch on any device, for any number of loader workers, and again after a resume.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch

GRAYSCALE = (0.2989, 0.587, 0.114)  # torchvision's RGB weights
BRIGHTNESS, CONTRAST, SATURATION = range(3)  # the columns of `factors`


class AugmentParams(NamedTuple):
    offsets: torch.Tensor  # [B, 2] crop's top row and left column in the padded image, 0..2 * padding
    flips: torch.Tensor  # [B] bool
    factors: torch.Tensor  # [B, 3] brightness, contrast, saturation factors
    orders: torch.Tensor  # [B, 3] the operation (BRIGHTNESS, ...) each image applies at step 0, 1, 2


@dataclass(frozen=True)
class Augmentation:
    crop_padding: int = 0
    hflip: bool = False
    jitter: float = 0.0  # brightness, contrast and saturation strength; 0: no colour jitter

    def draw(self, batch: int, generator: torch.Generator | None = None) -> AugmentParams:
        """Every image's parameters, from the CPU `generator` (None: torch's default CPU generator)."""
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (batch, 2), generator=generator)
        flips = torch.rand(batch, generator=generator) < 0.5
        if not self.hflip:
            flips.zero_()
        factors = torch.empty(batch, 3).uniform_(max(0.0, 1 - self.jitter), 1 + self.jitter, generator=generator)
        orders = torch.rand(batch, 3, generator=generator).argsort(dim=1)  # a uniformly random order per image
        return AugmentParams(offsets, flips, factors, orders)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [B, H, W, C] -> augmented float [B, C, H, W] in [0, 1] (in `out` if given), on the images'
        device."""
        return self.apply(images, self.draw(len(images), generator), out)

    def apply(self, images: torch.Tensor, params: AugmentParams, out: torch.Tensor | None = None) -> torch.Tensor:
        params = AugmentParams(*(p.to(images.device, non_blocking=True) for p in params))
        if self.crop_padding or self.hflip:
            images = crop_flip(images, params.offsets, params.flips, self.crop_padding)
        x = to_float(images, out)
        return color_jitter_(x, params.factors, params.orders) if self.jitter else x


def to_float(images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float [B, C, H, W] in [0, 1] (contiguous, in `out` if given), as torchvision's
    ToDtype(float32, scale=True)."""
    b, h, w, c = images.shape
    out = images.new_empty((b, c, h, w), dtype=torch.float32) if out is None else out
    return out.copy_(images.permute(0, 3, 1, 2)).mul_(1.0 / 255)


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Image b: rows offsets[b, 0] + (0..H-1), columns offsets[b, 1] + (0..W-1), reversed if flips[b], of the
    batch zero-padded by `padding` on every side. Each output row is a run of W pixels of one buffer: the batch's
    rows, then its mirror image's rows, each after `padding` zero pixels (which also pad the row before on the
    right), then a zero row for the rows of the top and bottom padding. The crops are one index_select of B * H
    runs."""
    b, h, w, c = images.shape
    width = w + padding  # of a buffer row
    rows = images.new_empty((2 * b * h + 1, width, c))
    rows[:, :padding].zero_()
    rows[-1].zero_()
    rows[:b * h, padding:] = images.reshape(b * h, w, c)
    # The mirror image: all the batch's pixels in reverse order (several times faster than flipping each row), so
    # image b's row i, reversed, is the mirror's row (B - b) * H - 1 - i.
    rows[b * h:-1, padding:] = images.reshape(b * h * w, c).flip(0).view(b * h, w, c)
    image = torch.arange(b, device=images.device)[:, None]
    source_row = offsets[:, :1] - padding + torch.arange(h, device=images.device)  # [B, H]; outside 0..H-1: padding
    row = torch.where(flips[:, None], (2 * b - image) * h - 1 - source_row, image * h + source_row)
    left = torch.where(flips, 2 * padding - offsets[:, 1], offsets[:, 1])[:, None]  # in the padded (mirror) image
    first_pixels = torch.where((source_row >= 0) & (source_row < h), row * width + left, (len(rows) - 1) * width)
    pixel_runs = rows.view(-1).as_strided((rows.numel() // c - w + 1, w * c), (c, 1))  # W pixels from each pixel
    return pixel_runs.index_select(0, first_pixels.view(-1)).view(b, h, w, c)


def color_jitter_(x: torch.Tensor, factors: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [0, 1], in place: image b blends with factor factors[b, op] for op in orders[b]."""
    other = x.new_empty((len(x), 1, *x.shape[2:]))
    for step in range(orders.shape[1]):
        operation = orders[:, step:step + 1]
        factor = factors.gather(1, operation).view(-1, 1, 1, 1)
        operation = operation.view(-1, 1, 1, 1)
        gray = torch.mul(x[:, 0:1], GRAYSCALE[0], out=other).add_(x[:, 1:2], alpha=GRAYSCALE[1])
        gray.add_(x[:, 2:3], alpha=GRAYSCALE[2])
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        # (1 - f) * other, other: the grayscale (saturation), its mean (contrast) or 0 (brightness)
        other.mul_((operation == SATURATION) * (1 - factor)).add_((operation == CONTRAST) * mean * (1 - factor))
        x.mul_(factor).add_(other).clamp_(0, 1)
    return x


def to_normalised(images: torch.Tensor, mean, std, augmentation: Augmentation | None = None,
                  generator: torch.Generator | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, H, W, C] -> normalised float [B, C, H, W] (in `out` if given), augmented first when `augmentation`
    is given (drawing from `generator`): what every training and test batch goes through."""
    x = augmentation(images, generator, out) if augmentation else to_float(images, out)
    return normalise_(x, mean, std)


def normalise_(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel of float [B, C, H, W], in place (torchvision's Normalize)."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x.sub_(mean).div_(std)
