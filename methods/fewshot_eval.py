"""Few-shot evaluation (MeLa's meta_test): logistic regression on frozen, L2-normalised features.

Each split's features are computed once (eval mode, no autograd, large batches). Task i of a split draws from
`np.random.RandomState(i)` alone (the reference's `np.random.seed(i)` stream, without touching the global RNG):
n_ways classes, then n_shots + n_queries images of each class, all without replacement; so task i is the same
for every model, run and worker, whatever the other tasks are. A scikit-learn LogisticRegression(C, lbfgs,
max_iter=1000, fit_intercept) is fit on the support set; the score is the query accuracy (0-1). Results are the
mean and the 95% t-interval half-width sem * t.ppf(0.975, n-1), per sub-dataset and over all tasks together.
"""
import contextlib
import math
from collections.abc import Mapping, Sequence

import joblib
import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from joblib import Parallel, delayed
from sklearn.linear_model import LogisticRegression

from engine.errors import UserError

NORM_EPS = 1e-8


def extract_features(model: torch.nn.Module, loader, device: torch.device | str, progress=None,
                     normalize: bool = True, autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [M, d] float32, labels [M] int64) on the CPU, for a loader of (images, labels, ...) batches, in
    the loader's order. The model runs in eval mode under inference_mode; its train/eval mode is restored.
    `progress(iterable, desc)` may wrap the loader (e.g. Session.progress); `autocast()` is the context of the
    forwards (e.g. Session.autocast; float32 by default). Features are L2-normalised (x / max(||x||, 1e-8))
    unless normalize=False."""
    was_training = model.training
    model.eval()
    features, labels = [], []
    batches = progress(loader, "features") if progress else loader
    try:
        with torch.inference_mode(), autocast():
            for batch in batches:
                out = model(batch[0].to(device, non_blocking=True)).float()
                if not torch.isfinite(out).all():
                    raise UserError("the model gives NaN/Inf features: its training diverged; use an earlier "
                                    "checkpoint or a lower learning_rate")
                features.append(out.cpu())
                labels.append(torch.as_tensor(batch[1]).long().cpu())
    finally:
        model.train(was_training)
    features = torch.cat(features)
    if normalize:
        features = F.normalize(features, dim=1, eps=NORM_EPS)
    return features, torch.cat(labels)


class TaskSampler:
    """Seeded few-shot tasks over one split's labels: `task(i)` -> (support, support_y, query, query_y) indices and
    local labels (0..n_ways-1 in the order the classes were drawn), each class's images drawn without replacement."""

    def __init__(self, labels, n_ways: int, n_shots: int, n_queries: int, split: str = "split"):
        labels = np.asarray(labels)
        self.classes = np.unique(labels)
        self.members = {c: np.flatnonzero(labels == c) for c in self.classes}
        self.n_ways, self.n_shots, self.n_queries = n_ways, n_shots, n_queries
        if n_ways > len(self.classes):
            raise UserError(f"n_ways={n_ways} but the {split} split has only {len(self.classes)} classes: lower n_ways")
        smallest = min(self.members, key=lambda c: len(self.members[c]))
        if n_shots + n_queries > len(self.members[smallest]):
            raise UserError(f"n_shots + n_queries = {n_shots} + {n_queries} but class {smallest} of the {split} split "
                            f"has only {len(self.members[smallest])} images: lower n_shots or n_queries")

    def task(self, index: int):
        rng = np.random.RandomState(index)
        classes = rng.choice(self.classes, self.n_ways, replace=False)
        picks = np.stack([rng.choice(self.members[c], self.n_shots + self.n_queries, replace=False)
                          for c in classes])
        local = np.arange(self.n_ways)
        return (picks[:, :self.n_shots].reshape(-1), np.repeat(local, self.n_shots),
                picks[:, self.n_shots:].reshape(-1), np.repeat(local, self.n_queries))


def _task_accuracies(features: np.ndarray, sampler: TaskSampler, indices, C: float, use_bias: bool) -> list[float]:
    scores = []
    for index in indices:
        support, support_y, query, query_y = sampler.task(int(index))
        classifier = LogisticRegression(C=C, solver="lbfgs", max_iter=1000, fit_intercept=use_bias)
        classifier.fit(features[support], support_y)
        scores.append(float((classifier.predict(features[query]) == query_y).mean()))
    return scores


def task_accuracies(features: torch.Tensor, labels: torch.Tensor, n_ways: int, n_shots: int, n_queries: int,
                    n_tasks: int, C: float = 1.0, use_bias: bool = True, n_jobs: int = 1,
                    split: str = "split") -> np.ndarray:
    """Query accuracy of tasks 0..n_tasks-1 on one split's features [M, d] (used as given, float32 as the
    reference). n_jobs > 1 runs chunks of tasks in parallel processes (joblib) with identical results."""
    sampler = TaskSampler(labels.cpu().numpy(), n_ways, n_shots, n_queries, split)
    features = features.detach().cpu().numpy()
    if n_jobs == 1:
        return np.asarray(_task_accuracies(features, sampler, range(n_tasks), C, use_bias))
    chunks = np.array_split(np.arange(n_tasks), 4 * joblib.effective_n_jobs(n_jobs))
    scores = Parallel(n_jobs=n_jobs)(delayed(_task_accuracies)(features, sampler, chunk, C, use_bias)
                                     for chunk in chunks if len(chunk))
    return np.concatenate(scores)


def mean_confidence_interval(scores: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the two-sided t-interval): sem * t.ppf((1 + confidence) / 2, n - 1)."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) < 2:
        return float(scores.mean()), math.nan
    half = scipy.stats.sem(scores) * scipy.stats.t.ppf((1 + confidence) / 2, len(scores) - 1)
    return float(scores.mean()), float(half)


def evaluate_splits(splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]], n_ways: int, shots: Sequence[int],
                    n_queries: int, n_tasks: int, C: float = 1.0, use_bias: bool = True,
                    n_jobs: int = 1) -> dict[int, dict[str, tuple[float, float]]]:
    """For each n_shots in `shots`: {sub-dataset name: (mean, ci95)} for every entry of `splits` (name ->
    (features, labels), e.g. each sub-dataset's test split) and "overall" over all their tasks concatenated."""
    results = {}
    for n_shots in shots:
        per_split = {name: task_accuracies(features, labels, n_ways, n_shots, n_queries, n_tasks, C, use_bias,
                                           n_jobs, split=name)
                     for name, (features, labels) in splits.items()}
        results[n_shots] = {name: mean_confidence_interval(scores) for name, scores in per_split.items()}
        results[n_shots]["overall"] = mean_confidence_interval(np.concatenate(list(per_split.values())))
    return results


def evaluate_model(model: torch.nn.Module, loaders: Mapping[str, object], device: torch.device | str,
                   n_ways: int, shots: Sequence[int], n_queries: int, n_tasks: int, C: float = 1.0,
                   use_bias: bool = True, is_norm: bool = True, n_jobs: int = 1, progress=None,
                   autocast=contextlib.nullcontext):
    """`evaluate_splits` on the features `model` gives for each loader (name -> loader of one split)."""
    splits = {name: extract_features(model, loader, device, progress, normalize=is_norm, autocast=autocast)
              for name, loader in loaders.items()}
    return evaluate_splits(splits, n_ways, shots, n_queries, n_tasks, C, use_bias, n_jobs)


def flat_metrics(results: dict[int, dict[str, tuple[float, float]]], prefix: str = "val") -> dict[str, float]:
    """{"val/5shot/aircraft": mean, "val/5shot/aircraft_ci95": half, ...} for the engine's metrics rows."""
    return {f"{prefix}/{shots}shot/{name}{suffix}": value
            for shots, per_split in results.items() for name, (mean, half) in per_split.items()
            for suffix, value in (("", mean), ("_ci95", half))}
