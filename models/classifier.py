"""Linear classifiers on a backbone's feature, for the supervised trainings (pseudo-labels, sup_baseline)."""
from collections.abc import Sequence

import torch.nn as nn


class Classifier(nn.Module):
    """Linear(feat_dim, n_cls) on the backbone: logits [B, n_cls]."""

    def __init__(self, backbone: nn.Module, n_cls: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feat_dim, n_cls)

    def forward(self, x):
        return self.head(self.backbone(x))


class MultiHeadClassifier(Classifier):
    """One Linear(feat_dim, sum(head_classes)) whose output is split into one logit block per head (h_aircraft:
    variant, family, maker): returns a tuple of [B, head_classes[h]] tensors."""

    def __init__(self, backbone: nn.Module, head_classes: Sequence[int]):
        super().__init__(backbone, sum(head_classes))
        self.head_classes = list(head_classes)

    def forward(self, x):
        return super().forward(x).split(self.head_classes, dim=1)
