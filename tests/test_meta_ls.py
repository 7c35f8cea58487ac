"""MetaLS: the dual ridge solution, the loss terms against independent float64 computations, batching."""
import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from train_epochs import meta_train_epoch

from methods.meta_ls import MetaLS, hinge_targets, meta_ls_loss, ridge_weights, with_intercept
from models import create_model

N_WAYS, SHOTS, QUERIES, DIM, LAM = 3, 2, 4, 5, 0.3


def task_batch(tasks=1, dim=DIM, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(N_WAYS).repeat_interleave(SHOTS).expand(tasks, -1)
    query_y = torch.arange(N_WAYS).repeat_interleave(QUERIES).expand(tasks, -1)
    support_f = torch.randn(tasks, N_WAYS * SHOTS, dim, generator=g, dtype=dtype)
    query_f = torch.randn(tasks, N_WAYS * QUERIES, dim, generator=g, dtype=dtype)
    return support_f, support_y, query_f, query_y


def primal_ridge(features, labels):
    """(X^T X + lam I)^-1 X^T Y with X = [features, 1]: the intercept column is penalised like the others."""
    x = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], 1)
    y = F.one_hot(labels, N_WAYS).double()
    return torch.linalg.solve(x.T @ x + LAM * torch.eye(x.shape[1], dtype=torch.float64), x.T @ y)


def test_dual_ridge_equals_primal_with_penalised_intercept():
    support_f, support_y, _, _ = task_batch()
    dual = ridge_weights(with_intercept(support_f), F.one_hot(support_y, N_WAYS).double(), LAM)[0]
    torch.testing.assert_close(dual, primal_ridge(support_f[0], support_y[0]), rtol=1e-9, atol=1e-10)


def test_hinge_targets_by_hand():
    support_y, query_y = torch.tensor([[0, 1]]), torch.tensor([[0, 0, 1, 1]])
    # order: s0 s1 q0 q1 q2 q3; same-class support/query pairs are dissimilar (the reference).
    expected = torch.tensor([[+1, -1, -1, -1, -1, -1],
                             [-1, +1, -1, -1, -1, -1],
                             [-1, -1, +1, +1, -1, -1],
                             [-1, -1, +1, +1, -1, -1],
                             [-1, -1, -1, -1, +1, +1],
                             [-1, -1, -1, -1, +1, +1]])
    assert torch.equal(hinge_targets(support_y, query_y).long()[0], expected)
    same_class = expected.clone()
    same_class[0, 2:4] = same_class[2:4, 0] = same_class[1, 4:6] = same_class[4:6, 1] = 1
    assert torch.equal(hinge_targets(support_y, query_y, "same_class").long()[0], same_class)


def independent_loss(support_f, support_y, query_f, query_y, extra_reg, positive_pairs="same_set"):
    w_s = primal_ridge(support_f, support_y)
    xq = torch.cat([query_f, torch.ones(len(query_f), 1, dtype=torch.float64)], 1)
    query_mse = ((xq @ w_s - F.one_hot(query_y, N_WAYS).double()) ** 2).mean()
    if not extra_reg:
        return query_mse
    w_all = primal_ridge(torch.cat([support_f, query_f]), torch.cat([support_y, query_y]))
    feats = torch.cat([support_f, query_f])
    labels = torch.cat([support_y, query_y]).tolist()
    sets = [0] * len(support_f) + [1] * len(query_f)
    pair_losses = []
    for i in range(len(feats)):
        for j in range(len(feats)):
            d = torch.sqrt(((feats[i] - feats[j]) ** 2).sum())
            similar = labels[i] == labels[j] and (sets[i] == sets[j] or positive_pairs == "same_class")
            pair_losses.append(d if similar else torch.clamp(1 - d, min=0))
    return query_mse + torch.stack(pair_losses).mean() + ((w_s - w_all) ** 2).mean()


@pytest.mark.parametrize("extra_reg", [True, False])
@pytest.mark.parametrize("positive_pairs", ["same_set", "same_class"])
def test_loss_equals_independent_computation(extra_reg, positive_pairs):
    support_f, support_y, query_f, query_y = task_batch(dim=4)
    support_f, query_f = support_f * 0.3, query_f * 0.3  # distances around the hinge margin
    loss, metrics = meta_ls_loss(support_f, support_y, query_f, query_y, N_WAYS, LAM, extra_reg, positive_pairs)
    expected = independent_loss(support_f[0], support_y[0], query_f[0], query_y[0], extra_reg, positive_pairs)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    if extra_reg:
        torch.testing.assert_close(metrics["loss"], metrics["query_mse"] + metrics["hinge"] + metrics["weight_gap"])
    else:
        assert "hinge" not in metrics and "weight_gap" not in metrics
        torch.testing.assert_close(loss, metrics["query_mse"])


def test_batched_tasks_average_the_per_task_losses_and_gradients():
    support_f, support_y, query_f, query_y = task_batch(tasks=3)
    support_f.requires_grad_(True)
    loss, _ = meta_ls_loss(support_f, support_y, query_f, query_y, N_WAYS, LAM)
    loss.backward()
    singles = [meta_ls_loss(support_f[t:t + 1].detach(), support_y[t:t + 1], query_f[t:t + 1], query_y[t:t + 1],
                            N_WAYS, LAM)[0] for t in range(3)]
    torch.testing.assert_close(loss, torch.stack(singles).mean())
    one = support_f[1:2].detach().requires_grad_(True)
    meta_ls_loss(one, support_y[1:2], query_f[1:2], query_y[1:2], N_WAYS, LAM)[0].backward()
    torch.testing.assert_close(support_f.grad[1:2] * 3, one.grad)
    assert torch.isfinite(support_f.grad).all()  # the zero distances on the diagonal give no NaN


def test_low_precision_features_solve_in_float32():
    support_f, support_y, query_f, query_y = task_batch(dtype=torch.float32)
    reference, _ = meta_ls_loss(support_f, support_y, query_f, query_y, N_WAYS, LAM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = meta_ls_loss(support_f.bfloat16(), support_y, query_f.bfloat16(), query_y, N_WAYS, LAM)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=0.05, atol=0.0)


def test_metals_runs_each_task_through_the_backbone():
    torch.manual_seed(0)
    backbone = create_model("conv4", width_mult=0.25).eval()
    learner = MetaLS(backbone, N_WAYS, lam=LAM, extra_reg=True)
    support_x = torch.randn(2, N_WAYS * SHOTS, 3, 16, 16)
    query_x = torch.randn(2, N_WAYS * QUERIES, 3, 16, 16)
    _, support_y, _, query_y = task_batch(tasks=2)
    loss, metrics = learner(support_x, support_y, query_x, query_y)
    feats = [backbone(torch.cat([s, q])) for s, q in zip(support_x, query_x)]
    support_f = torch.stack([f[:N_WAYS * SHOTS] for f in feats])
    query_f = torch.stack([f[N_WAYS * SHOTS:] for f in feats])
    expected, _ = meta_ls_loss(support_f, support_y, query_f, query_y, N_WAYS, LAM)
    torch.testing.assert_close(loss, expected)
    assert set(metrics) == {"loss", "query_mse", "query_acc", "hinge", "weight_gap"}
    assert list(learner.state_dict())[0].startswith("backbone.")


class FailingLearner(nn.Module):
    """A learner whose first `fail_times` losses are NaN."""

    def __init__(self, fail_times):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.fail_times = fail_times

    def forward(self, support_x, support_y, query_x, query_y):
        loss = self.weight.sum() * support_x.mean()
        if self.fail_times:
            self.fail_times -= 1
            loss = loss * float("nan")
        return loss, {"loss": loss.detach()}


def test_meta_train_epoch_retries_then_skips_non_finite_steps():
    session = SimpleNamespace(progress=lambda it, desc: it, to_device=lambda t: t, world_size=1,
                              autocast=contextlib.nullcontext)
    batches = [(torch.ones(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2))] * 2
    learner = FailingLearner(fail_times=3)
    result = meta_train_epoch(learner, batches, torch.optim.SGD(learner.parameters(), lr=0.1), session)
    assert result["train/skipped_steps"] == 0 and learner.weight.item() == pytest.approx(0.8)
    learner = FailingLearner(fail_times=7)
    result = meta_train_epoch(learner, batches, torch.optim.SGD(learner.parameters(), lr=0.1), session)
    assert result["train/skipped_steps"] == 1 and learner.weight.item() == pytest.approx(0.9)
