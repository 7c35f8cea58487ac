"""MAXL's networks around any registered backbone: the multi-task net and the label generator.

Heads are Linear(d, d) -> ReLU -> Linear(d, K) on the backbone's d-dim feature. Networks return logits; losses
take `log_softmax` (the reference applied softmax inside the net and took log(p + 1e-20)).
"""
import torch
import torch.nn as nn

from models.registry import create_model, register_model


def head(features: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.Linear(features, classes))


def init_maxl_weights(module: nn.Module, distribution: str) -> None:
    """Xavier (uniform for the multi-task nets, normal for the generator) with zero bias; BN weight 1, bias 0."""
    xavier = {"uniform": nn.init.xavier_uniform_, "normal": nn.init.xavier_normal_}[distribution]
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            xavier(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@register_model("multitask")
class MultiTaskNet(nn.Module):
    """A backbone with one head per task: `forward(x)` returns a tuple of logits, one per entry of `classes`.

    One entry is the single-task net; two are MAXL's primary and auxiliary heads. `backbone_args` go to the
    backbone's factory (e.g. width_mult).
    """

    def __init__(self, backbone: str, classes: list[int], **backbone_args):
        super().__init__()
        self.backbone = create_model(backbone, **backbone_args)
        self.heads = nn.ModuleList(head(self.backbone.feat_dim, k) for k in classes)
        init_maxl_weights(self, "uniform")

    def forward(self, x):
        features = self.backbone(x)
        return tuple(h(features) for h in self.heads)

    def shared_parameters(self):
        """The parameters every task's loss reaches (all but the heads): where COSSIM compares gradients."""
        return list(self.backbone.parameters())


def block_mask(psi: list[int]) -> torch.Tensor:
    """[len(psi), sum(psi)] booleans: primary class i owns auxiliary classes [sum(psi[:i]), sum(psi[:i+1]))."""
    owner = torch.repeat_interleave(torch.arange(len(psi)), torch.as_tensor(psi))
    return owner.unsqueeze(0) == torch.arange(len(psi)).unsqueeze(1)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the entries where `mask` is true; exact zeros elsewhere (no overflow: max is subtracted)."""
    return logits.masked_fill(~mask, float("-inf")).softmax(dim=1)


@register_model("label_generator")
class LabelGenerator(nn.Module):
    """MAXL's label generator: its own backbone and head; `forward(x, y)` gives a soft auxiliary label inside
    the psi block of each sample's primary class y.

    Its batch norm keeps no running statistics: the reference never puts the generator in eval mode, so it
    always normalises with batch statistics, in training and in the diagnostics alike.
    """

    def __init__(self, backbone: str, psi: list[int], **backbone_args):
        super().__init__()
        self.backbone = create_model(backbone, **backbone_args)
        self.head = head(self.backbone.feat_dim, sum(psi))
        self.register_buffer("mask", block_mask(psi), persistent=False)
        for m in self.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
        init_maxl_weights(self, "normal")

    def forward(self, x, y):
        return masked_softmax(self.head(self.backbone(x)), self.mask[y])

