"""Few-shot evaluation: features, seeded tasks, scikit-learn logistic regression, t-intervals, bad requests."""
import json
from types import SimpleNamespace

import joblib
import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from dataset.fewshot import FlatDataset, ImageTransform
from engine.errors import UserError
from engine.metrics import mean_ci95
from methods.fewshot_eval import (TaskSampler, accuracy_metrics, evaluate_splits, extract_features, gathered_features,
                                  task_accuracies)
from tools import fewshot_table


def split_features(n_classes=8, per_class=25, dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)[torch.randperm(n_classes * per_class, generator=g)]
    features = torch.randn(n_classes, dim, generator=g)[labels] + 1.5 * torch.randn(len(labels), dim, generator=g)
    return F.normalize(features, dim=1), labels + 3  # ids need not start at 0


def original_meta_test(features, labels, n_ways, n_shots, n_queries, n_tasks, C=1.0, use_bias=True):
    """The original's evaluation, written out: numpy float64 features, classes indexed in order of first
    appearance (a dict filled label by label), np.random.seed(i) per task, then n_ways classes and each class's
    n_shots + n_queries images drawn with the global numpy RNG; logistic regression on the support set; the mean
    and the 95% t-interval half-width. Returns (per-task accuracies, (mean, half-width))."""
    x = features.numpy().astype(np.float64)
    label_to_index = {}
    for index, label in enumerate(labels.tolist()):
        label_to_index.setdefault(label, []).append(index)
    saved = np.random.get_state()
    try:
        scores = []
        for i in range(n_tasks):
            np.random.seed(i)
            classes = np.random.choice(list(label_to_index), n_ways, replace=False)
            picks = [np.random.choice(label_to_index[c], n_shots + n_queries, replace=False) for c in classes]
            support, query = np.concatenate([p[:n_shots] for p in picks]), np.concatenate([p[n_shots:] for p in picks])
            clf = LogisticRegression(penalty="l2", C=C, solver="lbfgs", max_iter=1000, fit_intercept=use_bias,
                                     random_state=0).fit(x[support], np.repeat(np.arange(n_ways), n_shots))
            scores.append(np.mean(clf.predict(x[query]) == np.repeat(np.arange(n_ways), n_queries)))
    finally:
        np.random.set_state(saved)
    scores = np.array(scores)
    return scores, (scores.mean(), scipy.stats.sem(scores) * scipy.stats.t.ppf(0.975, len(scores) - 1))


def scrambled_ids(labels: torch.Tensor) -> torch.Tensor:
    """The same classes under non-contiguous ids whose first appearance is not in sorted order (as the
    h_aircraft family and maker levels)."""
    ids = torch.tensor([40, 3, 17, 8, 91, 25, 60, 12, 33, 5])
    return ids[labels - labels.min()]


def test_tasks_are_seeded_per_index_without_replacement():
    _, labels = split_features()
    sampler = TaskSampler(labels.numpy(), n_ways=5, n_shots=2, n_queries=4)
    support, support_y, query, query_y = sampler.task(7)
    # The documented protocol, written out: RandomState(i) draws the classes (in first-seen order), then each
    # class's images.
    rng = np.random.RandomState(7)
    first_seen = list(dict.fromkeys(labels.tolist()))
    classes = rng.choice(first_seen, 5, replace=False)
    picks = [rng.choice(np.flatnonzero(labels.numpy() == c), 6, replace=False) for c in classes]
    assert support.tolist() == [i for p in picks for i in p[:2]]
    assert query.tolist() == [i for p in picks for i in p[2:]]
    assert support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and query_y.tolist() == list(np.repeat(range(5), 4))
    assert (labels[support].view(5, 2) == torch.as_tensor(classes).view(5, 1)).all()
    assert len(set(support.tolist()) | set(query.tolist())) == 30
    state = np.random.get_state()[1].copy()
    assert all(np.array_equal(a, b) for a, b in zip(sampler.task(7), TaskSampler(labels.numpy(), 5, 2, 4).task(7)))
    assert np.array_equal(np.random.get_state()[1], state)  # the global numpy RNG is left alone


def test_task_classes_are_drawn_in_first_seen_order_as_the_original():
    features, labels = split_features(n_classes=10, per_class=12)
    labels = scrambled_ids(labels)
    assert list(dict.fromkeys(labels.tolist())) != sorted(set(labels.tolist()))
    sampler = TaskSampler(labels.numpy(), 5, 1, 5)
    assert sampler.classes.tolist() == list(dict.fromkeys(labels.tolist()))
    drawn = [labels[sampler.task(i)[0]].tolist() for i in range(20)]
    # The original's draw: np.random.seed(i), then choice over list(label_to_index).
    expected, by_sorted_ids = [], []
    for i in range(20):
        np.random.seed(i)
        expected.append(np.random.choice(list(dict.fromkeys(labels.tolist())), 5, replace=False).tolist())
        by_sorted_ids.append(np.random.RandomState(i).choice(np.unique(labels.numpy()), 5, replace=False).tolist())
    assert drawn == expected and drawn != by_sorted_ids  # sorted ids would give other tasks
    scores, interval = original_meta_test(features, labels, 5, 1, 5, n_tasks=20)
    assert np.array_equal(task_accuracies(features, labels, 5, 1, 5, n_tasks=20), scores)
    assert evaluate_splits({"s": (features, labels)}, 5, [1], 5, 20)[1]["s"] == pytest.approx(interval, rel=1e-12)


def float32_sensitive_features():
    """Rectified Gaussian classes in 128-d, close enough for the solver's precision to matter on some processors
    (found by search: there a float32 fit changes a 1-shot prediction)."""
    g = torch.Generator().manual_seed(38)
    labels = torch.arange(10).repeat_interleave(30)
    features = torch.randn(10, 128, generator=g)[labels] + 2 * torch.randn(len(labels), 128, generator=g)
    return F.normalize(features.relu(), dim=1), labels


def test_results_equal_the_original_procedure_on_the_same_features():
    features, labels = float32_sensitive_features()
    scores, interval = original_meta_test(features, labels, 5, 1, 15, n_tasks=8)
    assert np.array_equal(task_accuracies(features, labels, 5, 1, 15, n_tasks=8), scores)
    other, other_labels = split_features(seed=4)
    results = evaluate_splits({"a": (features, labels), "b": (other, other_labels)}, 5, [1, 5], 15, n_tasks=8)
    assert results[1]["a"] == pytest.approx(interval, rel=1e-12)  # the same accuracies, mean and interval
    for shots in (1, 5):
        a, b = original_meta_test(features, labels, 5, shots, 15, 8), original_meta_test(other, other_labels, 5,
                                                                                         shots, 15, 8)
        assert results[shots]["b"] == pytest.approx(b[1], rel=1e-12)
        together = np.concatenate([a[0], b[0]])
        assert results[shots]["overall"] == pytest.approx(
            (together.mean(), scipy.stats.sem(together) * scipy.stats.t.ppf(0.975, len(together) - 1)), rel=1e-12)
    # (That the fit is float64, as the original's, is asserted on its own: a float32 fit differs only on some data
    # and some processors, so no test relies on it.)


@pytest.mark.parametrize("shots,C,use_bias", [(1, 1.0, True), (5, 0.5, False)])
def test_accuracies_equal_the_original_procedure(shots, C, use_bias):
    features, labels = split_features()
    scores, _ = original_meta_test(features, labels, 5, shots, 6, n_tasks=4, C=C, use_bias=use_bias)
    assert np.array_equal(task_accuracies(features, labels, 5, shots, 6, n_tasks=4, C=C, use_bias=use_bias), scores)


def test_logistic_regression_is_fitted_on_float64(monkeypatch):
    seen = []

    class Recording(LogisticRegression):
        def fit(self, X, y, sample_weight=None):
            seen.append(X.dtype)
            return super().fit(X, y, sample_weight)

    monkeypatch.setattr("sklearn.linear_model.LogisticRegression", Recording)
    features, labels = split_features()
    task_accuracies(features.float(), labels, 5, 1, 5, n_tasks=3)
    assert seen == [np.float64] * 3


def test_parallel_tasks_give_identical_results():
    features, labels = split_features()
    serial = task_accuracies(features, labels, 5, 1, 6, n_tasks=6)
    with joblib.parallel_config(backend="threading"):  # the same chunking as worker processes, without their start-up
        assert np.array_equal(serial, task_accuracies(features, labels, 5, 1, 6, n_tasks=6, n_jobs=2))


def test_interval_equals_scipy_t_interval():
    scores = np.random.default_rng(0).uniform(0.4, 0.9, size=37)
    mean, half = mean_ci95(scores)
    low, high = scipy.stats.t.interval(0.95, len(scores) - 1, loc=scores.mean(), scale=scipy.stats.sem(scores))
    assert mean == pytest.approx(scores.mean()) and half == pytest.approx((high - low) / 2)
    assert mean_ci95(list(scores)) == (mean, half)  # a list, an array: the same numbers
    mean, half = mean_ci95([0.5])
    assert mean == 0.5 and np.isnan(half)


def test_the_table_of_several_meta_eval_runs(tmp_path, capsys):
    for name, accuracy in (("eval_a", 0.5), ("eval_b", 0.625)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"split": "test", "results": {
            "5": {"overall": {"mean": accuracy, "ci95": 0.01}}}}))
    fewshot_table.main([str(tmp_path / "eval_a"), str(tmp_path / "eval_b")])
    lines = capsys.readouterr().out.splitlines()
    assert "5-shot" in lines[0] and lines[1].split() == ["eval_a", "50.00", "+-", "1.00"]
    assert lines[2].split() == ["eval_b", "62.50", "+-", "1.00"]
    with pytest.raises(SystemExit) as stop:
        fewshot_table.main([str(tmp_path)])
    assert stop.value.code == 1 and "no results.json in" in capsys.readouterr().err


def test_overall_concatenates_the_splits_tasks():
    a, b = split_features(seed=1), split_features(n_classes=6, seed=2)
    results = evaluate_splits({"a": a, "b": b}, n_ways=5, shots=[1], n_queries=5, n_tasks=3)
    scores = np.concatenate([task_accuracies(*a, 5, 1, 5, 3), task_accuracies(*b, 5, 1, 5, 3)])
    assert results[1]["overall"] == pytest.approx(mean_ci95(scores))
    assert results[1]["a"] == pytest.approx(mean_ci95(scores[:3]))
    assert accuracy_metrics(results, "val") == {
        "val/1shot": results[1]["overall"][0], "val/1shot_ci95": results[1]["overall"][1],
        "val/1shot/a": results[1]["a"][0], "val/1shot/a_ci95": results[1]["a"][1],
        "val/1shot/b": results[1]["b"][0], "val/1shot/b_ci95": results[1]["b"][1]}
    one = evaluate_splits({"a": a}, n_ways=5, shots=[1], n_queries=5, n_tasks=3)
    assert set(accuracy_metrics(one, "val")) == {"val/1shot", "val/1shot_ci95"}  # one sub-dataset: overall only


def test_bad_requests_name_the_numbers():
    _, labels = split_features(n_classes=4, per_class=10)
    with pytest.raises(UserError, match="^n_ways=5 but the test split has only 4 classes: lower n_ways to at most 4$"):
        TaskSampler(labels.numpy(), 5, 1, 5, split="test")
    with pytest.raises(UserError, match=r"^n_shots=5 with n_queries=6 takes 11 images per class but class \d+ of the test split has 10: lower "
                                         r"n_shots or n_queries$"):
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


def test_features_are_float32_even_inside_bf16_autocast():
    torch.manual_seed(0)
    model = nn.Linear(16, 8)
    images = torch.randn(10, 16)
    loader = [(images[i:i + 5], torch.arange(i, i + 5)) for i in (0, 5)]
    with torch.no_grad():
        exact = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = model(images).float()
    assert not torch.equal(rounded, exact)  # autocast would change them
    with torch.autocast("cpu", dtype=torch.bfloat16):  # e.g. a validation called from a bf16 training step
        features, _ = extract_features(model, loader, "cpu", normalize=False)
    assert features.dtype == torch.float32 and torch.equal(features, exact)


def test_gathered_features_ignore_the_runs_precision():
    # The session of a precision=bf16 run: its autocast is not used for the features.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    flat = FlatDataset(np.random.default_rng(0).integers(0, 256, (7, 2, 2, 3), dtype=np.uint8), np.arange(7) % 3,
                       ImageTransform(mean=(0.5,) * 3, std=(0.25,) * 3))
    session = SimpleNamespace(
        device=torch.device("cpu"), world_size=1, progress=lambda iterable, desc: iterable,
        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        loader=lambda dataset, batch_size, shuffle: torch.utils.data.DataLoader(dataset, batch_size, shuffle=shuffle))
    with session.autocast():
        features, labels = gathered_features(model, flat, session, normalize=False)
    images, expected_labels = flat.load(np.arange(7))
    with torch.no_grad():
        assert torch.equal(features, model(images)) and torch.equal(labels, expected_labels)
