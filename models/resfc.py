"""fine_tune's network: ResFC, a residual MLP with LayerNorm, on a frozen backbone's L2-normalised features."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import register_model

NORM_EPS = 1e-8  # the same floor on the feature norm as the evaluation's normalisation


@register_model("resfc")
class ResFC(nn.Module):
    """o = Linear(ReLU(Linear(ReLU(Linear(x))))); o = x + o if `residual`; then LayerNorm(out_dim) if `layer_norm`.

    The hidden layers have `out_dim` units (the reference leaves the width implicit; fine_tune uses 640 -> 640).
    """

    def __init__(self, in_dim: int = 640, out_dim: int = 640, residual: bool = True, layer_norm: bool = True):
        super().__init__()
        if residual and in_dim != out_dim:
            raise ValueError(f"a residual ResFC needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Linear(out_dim, out_dim), nn.ReLU(),
                                 nn.Linear(out_dim, out_dim))
        self.residual = residual
        self.norm = nn.LayerNorm(out_dim) if layer_norm else nn.Identity()
        self.feat_dim = out_dim

    def forward(self, x):
        out = self.mlp(x)
        return self.norm(x + out if self.residual else out)


class FrozenBackboneHead(nn.Module):
    """head(L2-normalise(backbone(x))) with the backbone frozen: its parameters need no gradient, its forward runs
    without autograd, and it stays in eval mode (running BN statistics, no dropout/DropBlock) whatever `.train()`
    is called with. Only `head` is trained; `feat_dim` is the head's output size.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.head = head
        self.feat_dim = head.feat_dim

    def train(self, mode: bool = True):
        self.training = mode
        self.head.train(mode)
        self.backbone.eval()
        return self

    def forward(self, x):
        with torch.no_grad():
            features = self.backbone(x)
        return self.head(F.normalize(features, dim=1, eps=NORM_EPS))
