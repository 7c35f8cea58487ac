"""Supervised training of a backbone with a linear classifier: on the labeler's pseudo-labels (learn_labeler) and on
the true labels (sup_baseline, the oracle), including the three-head h_aircraft model.

With rotation augmentation the data layer yields each image four times, rotated by r x 90 degrees, with target
label + n_cls * r, so a head needs n_cls * 4 outputs. Multi-head targets are [B, heads] (h_aircraft: variant,
family, maker) and the loss is the mean of the heads' cross-entropies.
"""
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.training import SKIPPED_STEPS, guarded_step
from models.classifier import Classifier, MultiHeadClassifier

ROTATIONS = 4


def head_classes(n_cls: int, rotate_aug: bool) -> int:
    """Outputs a classifier head needs for n_cls classes (x4 with rotation augmentation)."""
    return n_cls * ROTATIONS if rotate_aug else n_cls


def build_classifier(backbone: nn.Module, n_cls: int | Sequence[int], rotate_aug: bool = False) -> nn.Module:
    """A Classifier for one label column, a MultiHeadClassifier for several (n_cls per head)."""
    if isinstance(n_cls, int):
        return Classifier(backbone, head_classes(n_cls, rotate_aug))
    return MultiHeadClassifier(backbone, [head_classes(n, rotate_aug) for n in n_cls])


def classification_loss(logits: torch.Tensor | tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy; for a tuple of head logits, the mean over heads of each head's cross-entropy against its
    column of targets [B, heads]."""
    if isinstance(logits, torch.Tensor):
        return F.cross_entropy(logits, targets)
    return torch.stack([F.cross_entropy(head, targets[:, h]) for h, head in enumerate(logits)]).mean()


def correct_share(logits: torch.Tensor | tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor:
    """Training accuracy; for several heads, the mean over heads."""
    if isinstance(logits, torch.Tensor):
        return (logits.argmax(1) == targets).float().mean()
    return torch.stack([(head.argmax(1) == targets[:, h]).float().mean() for h, head in enumerate(logits)]).mean()


def supervised_train_step(model: nn.Module, batch, optimizer: torch.optim.Optimizer, session, tracker) -> None:
    """One cross-entropy step on a batch of (images, targets, ...), added to `tracker` as sample-weighted
    train/loss and train/acc, with `train/skipped_steps` counting steps skipped for a non-finite loss. Forwards run
    under `session.autocast()`."""
    model.train()
    images, targets = session.to_device(batch[0]), session.to_device(batch[1])

    def compute():
        with session.autocast():
            logits = model(images)
            loss = classification_loss(logits, targets)
        return loss, {"loss": loss.detach(), "acc": correct_share(logits, targets)}

    metrics = guarded_step(compute, optimizer)
    tracker.total(SKIPPED_STEPS, int(metrics is None))
    for name, value in (metrics or {}).items():
        tracker.add(f"train/{name}", value, count=len(images))
