"""MeLa's networks: ResNet-12/18 with DropBlock, Conv-4, ResFC, the frozen-backbone wrapper, classifier heads."""
import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from train_epochs import supervised_train_epoch

from engine.errors import UserError
from methods.supervised import build_classifier, classification_loss, head_classes
from models import create_model
from models.classifier import Classifier, MultiHeadClassifier
from models.resfc import FrozenBackboneHead, ResFC
from models.resnet import DropBlock, dropblock_mask, dropblock_schedules_paused


def block_regularisers(model):
    return [type(block.regulariser).__name__ for block in model.layers]


@pytest.mark.parametrize("size", [32, 21, 84])
@pytest.mark.parametrize("name,blocks", [("resnet12", 4), ("resnet18", 6)])
def test_resnet_features_any_input_size(name, blocks, size):
    model = create_model(name, width_mult=0.125)
    assert len(model.layers) == blocks and model.feat_dim == 80
    assert model(torch.randn(2, 3, size, size)).shape == (2, 80)


def test_resnet_full_width_layout():
    r12 = create_model("resnet12")
    assert r12.feat_dim == 640
    assert [block.convs[0].out_channels for block in r12.layers] == [64, 160, 320, 640]
    assert block_regularisers(r12) == ["Dropout", "Dropout", "DropBlock", "DropBlock"]
    assert all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.1
               for m in r12.layers[0].convs if isinstance(m, nn.LeakyReLU))
    # ResNet-18 [1,1,2,2]: only the last block of stages 3 and 4 gets DropBlock; only a stage's first block pools.
    r18 = create_model("resnet18", width_mult=0.125)
    assert block_regularisers(r18) == ["Dropout", "Dropout", "Dropout", "DropBlock", "Dropout", "DropBlock"]
    assert [isinstance(block.pool, nn.MaxPool2d) for block in r18.layers] == [True, True, True, False, True, False]


def test_resnet_rejects_tiny_images():
    with pytest.raises(UserError, match="16x16"):
        create_model("resnet12", width_mult=0.125)(torch.randn(1, 3, 8, 8))


def test_conv4_and_alias():
    for name in ("conv4", "convnet4"):
        model = create_model(name, width_mult=0.25)
        assert model.feat_dim == 16 and model(torch.randn(3, 3, 32, 32)).shape == (3, 16)


def test_dropblock_keep_schedule_counts_every_forward():
    block = DropBlock(drop_rate=0.1, block_size=5)
    x = torch.randn(2, 4, 10, 10)
    block.train()
    block(x)
    block.eval()
    assert torch.equal(block(x), x)  # eval: identity, but the forward still counts (as the reference)
    assert int(block.steps) == 2
    assert block.keep_rate().item() == pytest.approx(1 - 0.1 / 40000 * 2)
    block.steps.fill_(400000)
    assert block.keep_rate().item() == pytest.approx(0.9)


def test_dropblock_drops_blocks_and_rescales():
    torch.manual_seed(0)
    block = DropBlock(drop_rate=0.1, block_size=5).train()
    block.steps.fill_(40000)  # keep rate 0.9
    x = torch.ones(16, 8, 20, 20)
    out = block(x)
    dropped = (out == 0).float().mean().item()
    assert 0.05 < dropped < 0.15
    assert out.sum().item() == pytest.approx(x.numel(), rel=1e-5)  # kept units are scaled by numel / kept
    # The dropped set is a union of 5x5 squares: a morphological opening by a 5x5 square leaves it unchanged.
    dropped = (out[:1, :1] == 0).float()
    inside = -F.max_pool2d(-dropped, 5, stride=1)  # 1 where a whole 5x5 window is dropped
    assert torch.equal(F.max_pool2d(F.pad(inside, (4, 4, 4, 4)), 5, stride=1), dropped)


def test_dropblock_counter_is_saved_and_restored():
    model = create_model("resnet12", width_mult=0.125).train()
    for _ in range(3):
        model(torch.randn(2, 3, 32, 32))
    state = model.state_dict()
    assert [int(v) for k, v in state.items() if k.endswith("regulariser.steps")] == [3, 3]
    resumed = create_model("resnet12", width_mult=0.125)
    resumed.load_state_dict(state)
    assert all(int(m.steps) == 3 for m in resumed.modules() if isinstance(m, DropBlock))
    resumed.train()(torch.randn(2, 3, 32, 32))
    assert all(int(m.steps) == 4 for m in resumed.modules() if isinstance(m, DropBlock))


def test_resfc_residual_and_layer_norm():
    torch.manual_seed(0)
    fc = create_model("resfc", in_dim=12, out_dim=12)
    x = torch.randn(5, 12)
    expected = F.layer_norm(x + fc.mlp(x), (12,), fc.norm.weight, fc.norm.bias)
    torch.testing.assert_close(fc(x), expected)
    linear1, relu, linear2 = fc.mlp[0], fc.mlp[1], fc.mlp[2]
    assert isinstance(relu, nn.ReLU) and linear1.out_features == linear2.in_features == 12
    plain = ResFC(12, 7, residual=False, layer_norm=False)
    torch.testing.assert_close(plain(x), plain.mlp(x))
    with pytest.raises(ValueError):
        ResFC(12, 7, residual=True)


def test_frozen_backbone_stays_in_eval_and_gets_no_gradients():
    torch.manual_seed(0)
    backbone = create_model("resnet12", width_mult=0.125)
    running_mean = backbone.layers[0].convs[1].running_mean.clone()
    grad_modes = []
    backbone.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    net = FrozenBackboneHead(backbone, ResFC(80, 80)).train()
    assert net.training and net.head.training
    assert not any(m.training for m in net.backbone.modules())
    x = torch.randn(4, 3, 32, 32)
    out = net(x)
    out.sum().backward()
    assert grad_modes == [False]
    assert all(p.grad is None and not p.requires_grad for p in net.backbone.parameters())
    assert all(p.grad is not None for p in net.head.parameters())
    torch.testing.assert_close(backbone.layers[0].convs[1].running_mean, running_mean)  # BN statistics frozen
    with torch.no_grad():
        expected = net.head(F.normalize(backbone(x), dim=1, eps=1e-8))
    torch.testing.assert_close(out.detach(), expected)
    assert net.feat_dim == 80


def test_classifier_heads():
    backbone = create_model("conv4", width_mult=0.25)
    x = torch.randn(6, 3, 16, 16)
    assert isinstance(build_classifier(backbone, 10), Classifier)
    assert build_classifier(backbone, 10, rotate_aug=True)(x).shape == (6, 40)
    assert head_classes(7, True) == 28 and head_classes(7, False) == 7
    multi = build_classifier(backbone, [5, 3, 2])
    assert isinstance(multi, MultiHeadClassifier)
    logits = multi(x)
    assert [t.shape[1] for t in logits] == [5, 3, 2]
    targets = torch.stack([torch.randint(0, n, (6,)) for n in (5, 3, 2)], dim=1)
    expected = sum(F.cross_entropy(head, targets[:, h]) for h, head in enumerate(logits)) / 3
    torch.testing.assert_close(classification_loss(logits, targets), expected)


def test_supervised_epoch_learns_separable_labels():
    torch.manual_seed(0)
    model = build_classifier(create_model("conv4", width_mult=0.25), [3, 2])
    images = torch.randn(48, 3, 8, 8)
    targets = torch.stack([torch.arange(48) % 3, torch.arange(48) % 2], dim=1)
    images += targets[:, :1, None, None].float()  # the first head's class shifts the image
    batches = [(images[i:i + 16], targets[i:i + 16], None) for i in range(0, 48, 16)]
    session = SimpleNamespace(progress=lambda it, desc: it, to_device=lambda t: t, world_size=1,
                              autocast=contextlib.nullcontext)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = supervised_train_epoch(model, batches, optimizer, session)
    for _ in range(4):
        last = supervised_train_epoch(model, batches, optimizer, session)
    assert set(first) == {"train/loss", "train/acc", "train/skipped_steps"}
    assert last["train/loss"] < first["train/loss"] and last["train/skipped_steps"] == 0


def original_mask_by_loops(seeds: torch.Tensor, size: int) -> torch.Tensor:
    """The original code's mask construction, step by step: the seed list (row-major) tiled size^2 times is
    paired entry by entry with the list of square offsets (row-major) tiled once per seed; every pair, and every
    seed at its padded position, is dropped."""
    n, c, valid_h, valid_w = seeds.shape
    dropped = torch.zeros(n, c, valid_h + size - 1, valid_w + size - 1)
    seed_list = [(b, ch, i, j) for b in range(n) for ch in range(c) for i in range(valid_h) for j in range(valid_w)
                 if seeds[b, ch, i, j]]
    offsets = [(di, dj) for di in range(size) for dj in range(size)]
    for (b, ch, i, j), (di, dj) in zip(seed_list * size**2, offsets * len(seed_list)):
        dropped[b, ch, i + di, j + dj] = 1
    for b, ch, i, j in seed_list:
        dropped[b, ch, i + (size - 1) // 2, j + (size - 1) // 2] = 1
    return 1 - dropped


def squares_by_loops(seeds: torch.Tensor, size: int) -> torch.Tensor:
    """Whole blocks: every seed at (i, j) drops rows i..i+size-1, columns j..j+size-1."""
    n, c, valid_h, valid_w = seeds.shape
    dropped = torch.zeros(n, c, valid_h + size - 1, valid_w + size - 1)
    for b, ch, i, j in seeds.nonzero().tolist():
        dropped[b, ch, i:i + size, j:j + size] = 1
    return 1 - dropped


def seeds_with(count: int, shape=(2, 3, 8, 8), seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    flat = torch.zeros(int(torch.tensor(shape).prod()))
    flat[torch.randperm(len(flat), generator=generator)[:count]] = 1
    return flat.reshape(shape)


@pytest.mark.parametrize("count", [1, 3, 5, 7, 10, 24, 25, 30, 50])
def test_reference_masks_are_the_original_construction_and_correct_masks_whole_blocks(count):
    seeds = seeds_with(count)
    reference = dropblock_mask(seeds, 5, "reference")
    assert torch.equal(reference, original_mask_by_loops(seeds, 5))
    correct = dropblock_mask(seeds, 5, "correct")
    assert torch.equal(correct, squares_by_loops(seeds, 5))
    # the original only differs when the number of seeds shares a factor with 25 (5 or 25 seeds, 10, 30, ...)
    assert torch.equal(reference, correct) == (count % 5 != 0)


def test_reference_masks_drop_partial_blocks_for_a_multiple_of_five_seeds():
    """Five seeds far apart: seed k gets the offsets k, k+5, ..., k+20, one column of the square, and its own
    centre pixel; so 5 or 6 of its 25 pixels. 25 seeds: each gets one offset plus its centre."""
    seeds = torch.zeros(1, 5, 9, 9)
    seeds[:, :, 4, 4] = 1  # one seed per channel: no overlaps
    dropped = 1 - dropblock_mask(seeds, 5, "reference")
    for k in range(5):
        column = k % 5
        expected = torch.zeros(13, 13)
        expected[4:9, 4 + column] = 1
        expected[6, 6] = 1
        assert torch.equal(dropped[0, k], expected), k
    assert (1 - dropblock_mask(seeds, 5, "correct")).sum() == 5 * 25


def test_dropblock_mode_reaches_every_dropblock():
    """(`model.dropblock` itself is checked with the other settings: tests/test_validation.py.)"""
    model = create_model("resnet18", width_mult=0.125, dropblock="reference")
    assert [m.construction for m in model.modules() if isinstance(m, DropBlock)] == ["reference"] * 2
    assert all(m.construction == "correct" for m in create_model("resnet12").modules() if isinstance(m, DropBlock))


def test_reference_dropblock_drops_less_on_average():
    """At the schedule's end (keep 0.9) on a 10x10 map (ResNet-12's stage 3 at 84x84): whole blocks drop about
    the scheduled share minus overlaps; the original's masks less, as a fifth of the forwards drop partial
    blocks."""
    x = torch.ones(8, 32, 10, 10)
    shares = {}
    for construction in ("correct", "reference"):
        torch.manual_seed(0)
        block = DropBlock(0.1, 5, construction).train()
        block.steps.fill_(40000)
        shares[construction] = sum((block(x) == 0).float().mean().item() for _ in range(200)) / 200
    assert 0.08 < shares["correct"] < 0.1
    assert shares["reference"] < shares["correct"] - 0.01


def test_paused_schedules_leave_the_counters():
    model = create_model("resnet12", width_mult=0.125).train()
    x = torch.randn(2, 3, 32, 32)
    model(x)
    with dropblock_schedules_paused(model):
        model(x)
    model(x)
    assert [int(m.steps) for m in model.modules() if isinstance(m, DropBlock)] == [2, 2]
    assert all(m.counting for m in model.modules() if isinstance(m, DropBlock))


def test_vgg16_takes_32_pixel_images_only():
    model = create_model("vgg16", width_mult=0.125)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    with pytest.raises(UserError, match="VGG-16 takes images of 32x32 pixels .* got 84x84: resize the images"):
        model(torch.randn(1, 3, 84, 84))
