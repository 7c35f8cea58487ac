"""MeLa's networks: ResNet-12/18 with DropBlock, Conv-4, ResFC, the frozen-backbone wrapper, classifier heads."""
import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import UserError
from methods.supervised import build_classifier, classification_loss, head_classes, supervised_train_epoch
from models import create_model
from models.classifier import Classifier, MultiHeadClassifier
from models.resfc import FrozenBackboneHead, ResFC
from models.resnet import DropBlock


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
