"""Few-shot evaluation: features, seeded tasks, scikit-learn logistic regression, t-intervals, bad requests."""
import joblib
import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from engine.errors import UserError
from methods.fewshot_eval import (TaskSampler, evaluate_splits, extract_features, flat_metrics,
                                  mean_confidence_interval, task_accuracies)


def split_features(n_classes=8, per_class=25, dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)[torch.randperm(n_classes * per_class, generator=g)]
    features = torch.randn(n_classes, dim, generator=g)[labels] + 1.5 * torch.randn(len(labels), dim, generator=g)
    return F.normalize(features, dim=1), labels + 3  # ids need not start at 0


def test_tasks_are_seeded_per_index_without_replacement():
    _, labels = split_features()
    sampler = TaskSampler(labels.numpy(), n_ways=5, n_shots=2, n_queries=4)
    support, support_y, query, query_y = sampler.task(7)
    # The documented protocol, written out: RandomState(i) draws the classes, then each class's images.
    rng = np.random.RandomState(7)
    classes = rng.choice(np.unique(labels.numpy()), 5, replace=False)
    picks = [rng.choice(np.flatnonzero(labels.numpy() == c), 6, replace=False) for c in classes]
    assert support.tolist() == [i for p in picks for i in p[:2]]
    assert query.tolist() == [i for p in picks for i in p[2:]]
    assert support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and query_y.tolist() == list(np.repeat(range(5), 4))
    assert (labels[support].view(5, 2) == torch.as_tensor(classes).view(5, 1)).all()
    assert len(set(support.tolist()) | set(query.tolist())) == 30
    state = np.random.get_state()[1].copy()
    assert all(np.array_equal(a, b) for a, b in zip(sampler.task(7), TaskSampler(labels.numpy(), 5, 2, 4).task(7)))
    assert np.array_equal(np.random.get_state()[1], state)  # the global numpy RNG is left alone


@pytest.mark.parametrize("shots,use_bias", [(1, True), (5, False)])
def test_accuracies_equal_sklearn_called_directly(shots, use_bias):
    features, labels = split_features()
    scores = task_accuracies(features, labels, 5, shots, 6, n_tasks=4, C=0.5, use_bias=use_bias)
    sampler = TaskSampler(labels.numpy(), 5, shots, 6)
    x = features.numpy()
    for i, score in enumerate(scores):
        support, support_y, query, query_y = sampler.task(i)
        clf = LogisticRegression(C=0.5, solver="lbfgs", max_iter=1000, fit_intercept=use_bias).fit(x[support],
                                                                                                 support_y)
        assert score == clf.score(x[query], query_y)


def test_parallel_tasks_give_identical_results():
    features, labels = split_features()
    serial = task_accuracies(features, labels, 5, 1, 6, n_tasks=6)
    with joblib.parallel_config(backend="threading"):  # the same chunking as worker processes, without their start-up
        assert np.array_equal(serial, task_accuracies(features, labels, 5, 1, 6, n_tasks=6, n_jobs=2))


def test_interval_equals_scipy_t_interval():
    scores = np.random.default_rng(0).uniform(0.4, 0.9, size=37)
    mean, half = mean_confidence_interval(scores)
    low, high = scipy.stats.t.interval(0.95, len(scores) - 1, loc=scores.mean(), scale=scipy.stats.sem(scores))
    assert mean == pytest.approx(scores.mean()) and half == pytest.approx((high - low) / 2)


def test_overall_concatenates_the_splits_tasks():
    a, b = split_features(seed=1), split_features(n_classes=6, seed=2)
    results = evaluate_splits({"a": a, "b": b}, n_ways=5, shots=[1], n_queries=5, n_tasks=3)
    scores = np.concatenate([task_accuracies(*a, 5, 1, 5, 3), task_accuracies(*b, 5, 1, 5, 3)])
    assert results[1]["overall"] == pytest.approx(mean_confidence_interval(scores))
    assert results[1]["a"] == pytest.approx(mean_confidence_interval(scores[:3]))
    assert set(flat_metrics(results)) == {"val/1shot/a", "val/1shot/a_ci95", "val/1shot/b", "val/1shot/b_ci95",
                                          "val/1shot/overall", "val/1shot/overall_ci95"}


def test_bad_requests_name_the_numbers():
    _, labels = split_features(n_classes=4, per_class=10)
    with pytest.raises(UserError, match="n_ways=5 but the test split has only 4 classes"):
        TaskSampler(labels.numpy(), 5, 1, 5, split="test")
    with pytest.raises(UserError, match=r"n_shots \+ n_queries = 5 \+ 6 but class .* has only 10 images"):
        TaskSampler(labels.numpy(), 3, 5, 6, split="test")


class Recorder(nn.Module):
    """Doubles its input; records the mode and autograd state of each call."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return x.flatten(1) * self.scale


def test_extract_features_in_eval_mode_without_autograd():
    images = torch.randn(10, 1, 2, 2)
    labels = torch.arange(10)
    loader = [(images[i:i + 4], labels[i:i + 4], torch.arange(i, min(i + 4, 10))) for i in range(0, 10, 4)]
    model = Recorder().train()
    features, got_labels = extract_features(model, loader, "cpu")
    assert model.calls == [(False, False)] * 3 and model.training  # mode restored afterwards
    torch.testing.assert_close(features, F.normalize(images.flatten(1) * 2, dim=1))
    assert torch.equal(got_labels, labels) and features.dtype == torch.float32
    raw, _ = extract_features(model, loader, "cpu", normalize=False)
    torch.testing.assert_close(raw, images.flatten(1) * 2)
    model.scale.data.fill_(float("nan"))
    with pytest.raises(UserError, match="NaN"):
        extract_features(model, loader, "cpu")
