"""Batched augmentation (dataset/augment.py) against torchvision's per-image transforms: the same image for the same
parameters, the same distribution of parameters, the same batch for the same seed."""
import itertools

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dataset.augment import BRIGHTNESS, CONTRAST, SATURATION, Augmentation, AugmentParams

PADDING, JITTER, DRAWS = 4, 0.4, 4000
MELA = Augmentation(PADDING, hflip=True, jitter=JITTER)
ADJUST = {BRIGHTNESS: F.adjust_brightness, CONTRAST: F.adjust_contrast, SATURATION: F.adjust_saturation}


def per_image_reference(image: torch.Tensor, params: AugmentParams, b: int, jitter: bool,
                        padding: int = PADDING) -> torch.Tensor:
    """torchvision v2, one image [H, W, C] uint8: RandomCrop's pad and crop, flip, ToDtype, ColorJitter's steps."""
    h, w = image.shape[:2]
    x = F.pad(image.permute(2, 0, 1), [padding], fill=0)
    x = F.crop(x, int(params.offsets[b, 0]), int(params.offsets[b, 1]), h, w)
    if params.flips[b]:
        x = F.horizontal_flip(x)
    x = F.to_dtype(x, torch.float32, scale=True)
    for operation in params.orders[b].tolist() if jitter else []:
        x = ADJUST[operation](x, float(params.factors[b, operation]))
    return x


@pytest.fixture
def images():
    return torch.randint(0, 256, (24, 10, 12, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_crop_and_flip_equal_torchvision_exactly(images):
    crop_flip = Augmentation(PADDING, hflip=True)
    params = crop_flip.draw(len(images), torch.Generator().manual_seed(1))
    assert params.flips.any() and not params.flips.all() and (params.offsets == 0).any()
    expected = torch.stack([per_image_reference(image, params, b, jitter=False) for b, image in enumerate(images)])
    assert torch.equal(crop_flip.apply(images, params), expected)


@pytest.mark.parametrize("padding, batch", [(0, 24), (1, 1), (13, 5)])  # 13: wider than the image
def test_crop_and_flip_equal_torchvision_for_any_padding_and_batch(images, padding, batch):
    crop_flip = Augmentation(padding, hflip=True)
    params = crop_flip.draw(batch, torch.Generator().manual_seed(padding))
    expected = torch.stack([per_image_reference(image, params, b, jitter=False, padding=padding)
                            for b, image in enumerate(images[:batch])])
    assert torch.equal(crop_flip.apply(images[:batch], params), expected)


def test_colour_jitter_equals_torchvision_to_float_rounding(images):
    # torchvision blends with add_(alpha=...), which may be fused (FMA) on some CPUs: equal to float32 rounding.
    params = MELA.draw(len(images), torch.Generator().manual_seed(2))
    assert len({tuple(order) for order in params.orders.tolist()}) > 3
    expected = torch.stack([per_image_reference(image, params, b, jitter=True) for b, image in enumerate(images)])
    torch.testing.assert_close(MELA.apply(images, params), expected, atol=1e-6, rtol=0)


def test_parameters_follow_torchvision_distributions():
    ours = MELA.draw(DRAWS, torch.Generator().manual_seed(3))
    image = torch.zeros(3, 10, 10, dtype=torch.uint8)
    crop, jitter = v2.RandomCrop(10, padding=PADDING), v2.ColorJitter(JITTER, JITTER, JITTER)
    torch.manual_seed(3)
    crops = [crop.make_params([image]) for _ in range(DRAWS)]
    theirs = torch.tensor([[p["top"], p["left"]] for p in crops])
    colours = [jitter.make_params([image]) for _ in range(DRAWS)]
    their_factors = torch.tensor([[p[f"{k}_factor"] for k in ("brightness", "contrast", "saturation")]
                                  for p in colours])
    their_orders = [tuple(i for i in p["fn_idx"].tolist() if i != 3) for p in colours]  # 3: hue, not jittered
    for offsets in (ours.offsets, theirs):  # uniform over 0..2 * padding in each axis
        counts = torch.stack([torch.bincount(offsets[:, axis], minlength=2 * PADDING + 1) for axis in (0, 1)])
        assert counts.shape[1] == 2 * PADDING + 1
        assert ((counts / DRAWS - 1 / (2 * PADDING + 1)).abs() < 0.03).all()
    assert abs(ours.flips.float().mean() - 0.5) < 0.03
    for factors in (ours.factors, their_factors):  # uniform in [0.6, 1.4]
        assert factors.min() >= 1 - JITTER and factors.max() <= 1 + JITTER
        quartiles = torch.quantile(factors, torch.tensor([0.25, 0.5, 0.75]), dim=0)
        assert ((quartiles - torch.tensor([0.8, 1.0, 1.2])[:, None]).abs() < 0.03).all()
    for orders in ([tuple(o) for o in ours.orders.tolist()], their_orders):  # each of the 6 orders, 1/6 each
        shares = [orders.count(order) / DRAWS for order in itertools.permutations(range(3))]
        assert all(abs(share - 1 / 6) < 0.03 for share in shares)


def test_same_seed_same_batch_and_each_image_its_own_draw(images):
    first, again, other = (MELA(images, torch.Generator().manual_seed(seed)) for seed in (5, 5, 6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    same = MELA(images[:1].expand(8, -1, -1, -1), torch.Generator().manual_seed(5))
    assert len({tuple(x.flatten().tolist()) for x in same}) == 8  # one image, eight different augmentations


def test_no_augmentation_is_conversion_only(images):
    x = Augmentation()(images, torch.Generator().manual_seed(0))
    assert torch.equal(x, F.to_dtype(images.permute(0, 3, 1, 2), torch.float32, scale=True))
