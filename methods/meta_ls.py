"""MeLa's meta-learner (MetaLS): closed-form ridge regression as the base learner, differentiated through.

For a task with support features F_S (labels y_S) and query features F_Q, each with a constant-1 column appended
(an intercept, penalised like every other weight):
    W(X, y) = X^T (X X^T + lam I)^-1 onehot(y)          dual form: an n x n solve, n = images of the task
    W_s = W(F_S, y_S),  W_* = W(F_S u F_Q, y_S u y_Q)   gradients flow through both
    loss = MSE(F_Q W_s, onehot(y_Q))                      mean over all N_Q x N entries
         + hinge_embedding(cdist(F, F), T, margin 1)      with extra_reg: mean over all n^2 pairs
         + MSE(W_s, W_*)                                  with extra_reg
T is +1 for same-class pairs in the same set (both support or both query) and -1 for every other pair, including
same-class support/query pairs (the reference); positive_pairs="same_class" makes every same-class pair +1.

Several tasks are batched along a leading axis T; the loss is the mean of the per-task losses. The algebra runs in
float32 at least (float64 stays float64), also under autocast.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.settings import POSITIVE, POSITIVE_INT, Boolean, OneOf, setting
from methods.training import SKIPPED_STEPS, guarded_step

POSITIVE_PAIRS = ("same_set", "same_class")


@dataclass
class RidgeSettings:
    """The ridge strength (learn_labeler: its validation's C = 1 / lam)."""

    lam: float = setting(0.001, POSITIVE, "ridge strength (dual form, intercept column penalised)")


@dataclass
class MetaLSSettings(RidgeSettings):
    """MetaLS meta-training."""

    extra_reg: bool = setting(True, Boolean(), "the hinge-embedding and W_s-vs-W_* terms")
    positive_pairs: str = setting("same_set", OneOf(POSITIVE_PAIRS), "hinge +1 pairs: same class in the same set "
                                  "(the reference) | same_class")
    tasks_per_step: int = setting(1, POSITIVE_INT, "tasks averaged per optimiser step (over all processes)")


def with_intercept(features: torch.Tensor) -> torch.Tensor:
    """[..., n, d] -> [..., n, d + 1], the last column all ones."""
    return torch.cat([features, features.new_ones(*features.shape[:-1], 1)], dim=-1)


def ridge_weights(x: torch.Tensor, targets: torch.Tensor, lam: float) -> torch.Tensor:
    """Dual-form ridge solution X^T (X X^T + lam I)^-1 Y for batched x [T, n, p] and targets [T, n, c]: [T, p, c]."""
    gram = x @ x.mT
    gram = gram + lam * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return x.mT @ torch.linalg.solve(gram, targets)


def hinge_targets(support_y: torch.Tensor, query_y: torch.Tensor, positive_pairs: str = "same_set") -> torch.Tensor:
    """[T, n, n] pair targets over the images (support first, then query): +1 similar, -1 dissimilar."""
    labels = torch.cat([support_y, query_y], dim=-1)
    similar = labels.unsqueeze(-1) == labels.unsqueeze(-2)
    if positive_pairs == "same_set":
        n_support = support_y.shape[-1]
        in_support = torch.arange(labels.shape[-1], device=labels.device) < n_support
        similar &= in_support.unsqueeze(-1) == in_support.unsqueeze(-2)
    return similar.to(torch.int8) * 2 - 1


def meta_ls_loss(support_f: torch.Tensor, support_y: torch.Tensor, query_f: torch.Tensor, query_y: torch.Tensor,
                 n_ways: int, lam: float, extra_reg: bool = True,
                 positive_pairs: str = "same_set") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MetaLS loss of T tasks: features [T, n_s, d] / [T, n_q, d], local labels [T, n_s] / [T, n_q] in
    0..n_ways-1. Returns (loss, metrics); metrics are detached tensors (query_mse, query_acc, and with extra_reg
    hinge and weight_gap), left on the device so that a training step never waits for them."""
    dtype = torch.promote_types(support_f.dtype, torch.float32)
    with torch.autocast(support_f.device.type, enabled=False):
        support_f, query_f = support_f.to(dtype), query_f.to(dtype)
        support_x, query_x = with_intercept(support_f), with_intercept(query_f)
        support_t = F.one_hot(support_y, n_ways).to(dtype)
        query_t = F.one_hot(query_y, n_ways).to(dtype)
        w_support = ridge_weights(support_x, support_t, lam)
        query_pred = query_x @ w_support
        query_mse = F.mse_loss(query_pred, query_t)
        metrics = {"query_mse": query_mse.detach(),
                   "query_acc": (query_pred.argmax(-1) == query_y).to(dtype).mean().detach()}
        loss = query_mse
        if extra_reg:
            features = torch.cat([support_f, query_f], dim=1)
            # Exact pairwise distances (the matmul shortcut is imprecise near 0, e.g. on the diagonal).
            distances = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist")
            targets = hinge_targets(support_y, query_y, positive_pairs).to(dtype)
            hinge = F.hinge_embedding_loss(distances, targets, margin=1.0)
            w_all = ridge_weights(torch.cat([support_x, query_x], dim=1), torch.cat([support_t, query_t], dim=1), lam)
            weight_gap = F.mse_loss(w_support, w_all)
            loss = loss + hinge + weight_gap
            metrics.update(hinge=hinge.detach(), weight_gap=weight_gap.detach())
        metrics["loss"] = loss.detach()
    return loss, metrics


class MetaLS(nn.Module):
    """The backbone and the MetaLS loss: `forward(support_x, support_y, query_x, query_y)` on T stacked tasks
    ([T, N*K, C, H, W], [T, N*K], [T, N*Q, C, H, W], [T, N*Q]; or one task without the T axis) returns
    (loss, metrics).

    Each task's support and query images go through the backbone together, one task per forward as the
    reference (so batch-norm statistics and the DropBlock schedule count per task whatever tasks_per_step is).
    The state_dict holds `backbone.*`.
    """

    def __init__(self, backbone: nn.Module, n_ways: int, lam: float = 1e-3, extra_reg: bool = True,
                 positive_pairs: str = "same_set"):
        super().__init__()
        self.backbone = backbone
        self.n_ways, self.lam, self.extra_reg, self.positive_pairs = n_ways, lam, extra_reg, positive_pairs

    def forward(self, support_x, support_y, query_x, query_y):
        if support_x.dim() == 4:  # one task, unbatched
            support_x, support_y = support_x.unsqueeze(0), support_y.unsqueeze(0)
            query_x, query_y = query_x.unsqueeze(0), query_y.unsqueeze(0)
        n_support = support_x.shape[1]
        features = torch.stack([self.backbone(torch.cat([s, q])) for s, q in zip(support_x, query_x)])
        return meta_ls_loss(features[:, :n_support], support_y, features[:, n_support:], query_y, self.n_ways,
                            self.lam, self.extra_reg, self.positive_pairs)


def meta_train_step(learner: nn.Module, batch, optimizer: torch.optim.Optimizer, session, tracker) -> None:
    """One meta-training step on a batch of few-shot tasks (one task, or tasks_per_step stacked ones; each batch
    starts support_x, support_y, query_x, query_y), added to `tracker` as `train/...` means, with
    `train/skipped_steps` counting steps skipped for a non-finite loss (see methods.training.guarded_step).
    Forwards run under `session.autocast()` (bf16 on a GPU when precision allows; the ridge algebra stays float32)."""
    learner.train()
    support_x, support_y, query_x, query_y = (session.to_device(t) for t in batch[:4])

    def compute():
        with session.autocast():
            return learner(support_x, support_y, query_x, query_y)

    metrics = guarded_step(compute, optimizer)
    tracker.total(SKIPPED_STEPS, int(metrics is None))
    n_tasks = len(support_x) if support_x.dim() == 5 else 1
    for name, value in (metrics or {}).items():
        tracker.add(f"train/{name}", value, count=n_tasks)
