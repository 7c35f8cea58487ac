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

from engine.metrics import MeanTracker
from methods.training import guarded_step
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


def supervised_train_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, session,
                           desc: str = "train") -> dict[str, float]:
    """One epoch of cross-entropy training over a loader of (images, targets, ...) batches. Returns the
    sample-weighted means of train/loss and train/acc, and the steps skipped for a non-finite loss. Forwards run
    under `session.autocast()`."""
    model.train()
    tracker = MeanTracker()
    skipped = 0
    for batch in session.progress(loader, desc):
        images, targets = session.to_device(batch[0]), session.to_device(batch[1])

        def compute():
            with session.autocast():
                logits = model(images)
                loss = classification_loss(logits, targets)
            return loss, {"loss": loss.detach(), "acc": correct_share(logits, targets)}

        metrics = guarded_step(compute, optimizer)
        if metrics is None:
            skipped += 1
            continue
        for name, value in metrics.items():
            tracker.add(f"train/{name}", value, count=len(images))
    return {**tracker.result(session), "train/skipped_steps": skipped}
