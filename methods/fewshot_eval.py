"""Few-shot evaluation (MeLa's meta_test): logistic regression on frozen, L2-normalised features.

Each split's features are computed once (eval mode, no autograd, float32 whatever the training precision). Task i
of a split draws from `np.random.RandomState(i)` alone (the original's `np.random.seed(i)` stream, without touching
the global RNG): n_ways classes out of the split's classes in order of first appearance in its labels (the
original's `list(label_to_index)`), then n_shots + n_queries images of each class (its images in index order), all
without replacement; so task i is the original's task i for the same labels, and the same for every model, run and
worker. A scikit-learn LogisticRegression(C, lbfgs, max_iter=1000, fit_intercept) is fit on the support features
in float64 (as the original hands it numpy float64 arrays); the score is the query accuracy (0-1). Results: the
mean and the 95% t-interval half-width (`engine.metrics.mean_ci95`), per sub-dataset and over all tasks together.
"""
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dataset.fewshot import FlatDataset, load_split
from dataset.fewshot.tasks import check_tasks_fit
from engine.distributed import gather_objects, gather_shards, is_distributed
from engine.errors import UserError
from engine.metrics import mean_ci95
from engine.settings import POSITIVE, POSITIVE_INT, Boolean, IntegerList, setting

NORM_EPS = 1e-8
EVAL_BATCH = 256  # images per forward when extracting features (no autograd: large batches are cheap)


@dataclass
class EvaluationSettings:
    """Few-shot evaluation: logistic regression on the features of a split's tasks."""

    val_n_shots: list = setting([5], IntegerList(1, "[1,5]"), "support images per class of the evaluated tasks "
                                "(best.pt follows the first; best_<k>shot.pt the others)")
    test_db_size: int = setting(1000, POSITIVE_INT, "evaluation tasks per sub-dataset")
    use_bias: bool = setting(True, Boolean(), "the logistic regression's intercept")
    is_norm: bool = setting(True, Boolean(), "L2-normalised features")


@dataclass
class ClassifierSettings:
    """The evaluation's logistic regression."""

    test_C: float = setting(1.0, POSITIVE, "its inverse regularisation strength C")


@dataclass
class ValidationSettings:
    """Validation of a training step on the val split."""

    val_n_ways: int = setting(5, POSITIVE_INT, "classes per validation task")


def extract_features(model: torch.nn.Module, loader, device: torch.device | str, progress=None,
                     normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [M, d] float32, labels [M] int64) on the CPU, in the loader's order, L2-normalised
    (x / max(||x||, 1e-8)) unless normalize=False. The model runs in eval mode (then its mode is restored), without
    autograd, in float32: autocast is off even inside an autocast region (bf16 training must not change what is
    evaluated or labelled). `progress(iterable, desc)` may wrap the loader (e.g. Session.progress)."""
    was_training = model.training
    model.eval()
    features, labels = [], []
    batches = progress(loader, "features") if progress else loader
    try:
        with torch.inference_mode(), torch.autocast(torch.device(device).type, enabled=False):
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
    local labels (0..n_ways-1 in the order the classes were drawn), each class's images drawn without replacement.
    `classes` lists the class ids in order of first appearance in `labels` (what the draw picks from)."""

    def __init__(self, labels, n_ways: int, n_shots: int, n_queries: int, split: str = "split"):
        labels = np.asarray(labels)
        _, first_seen = np.unique(labels, return_index=True)
        self.classes = labels[np.sort(first_seen)]
        self.members = {c: np.flatnonzero(labels == c) for c in self.classes}
        self.n_ways, self.n_shots, self.n_queries = n_ways, n_shots, n_queries
        check_tasks_fit(labels, f"the {split} split", n_ways, n_shots, n_queries)

    def task(self, index: int):
        rng = np.random.RandomState(index)
        classes = rng.choice(self.classes, self.n_ways, replace=False)
        picks = np.stack([rng.choice(self.members[c], self.n_shots + self.n_queries, replace=False)
                          for c in classes])
        local = np.arange(self.n_ways)
        return (picks[:, :self.n_shots].reshape(-1), np.repeat(local, self.n_shots),
                picks[:, self.n_shots:].reshape(-1), np.repeat(local, self.n_queries))


def _task_accuracies(features: np.ndarray, sampler: TaskSampler, indices, C: float, use_bias: bool) -> list[float]:
    from sklearn import linear_model  # imported when first needed: scripts start faster

    scores = []
    for index in indices:
        support, support_y, query, query_y = sampler.task(int(index))
        classifier = linear_model.LogisticRegression(C=C, solver="lbfgs", max_iter=1000, fit_intercept=use_bias)
        classifier.fit(features[support], support_y)
        scores.append(float((classifier.predict(features[query]) == query_y).mean()))
    return scores


def task_accuracies(features: torch.Tensor, labels: torch.Tensor, n_ways: int, n_shots: int, n_queries: int,
                    n_tasks: int, C: float = 1.0, use_bias: bool = True, n_jobs: int = 1,
                    split: str = "split") -> np.ndarray:
    """Query accuracy of tasks 0..n_tasks-1 on one split's features [M, d], fitted in float64 (float32 input
    makes scikit-learn solve in float32, whose looser convergence changes some tasks' predictions). n_jobs > 1
    runs chunks of tasks in parallel processes (joblib) with identical results. In a distributed run each rank
    scores every world_size-th task and the scores are gathered (same result)."""
    sampler = TaskSampler(labels.cpu().numpy(), n_ways, n_shots, n_queries, split)
    features = features.detach().cpu().to(torch.float64).numpy()
    world = torch.distributed.get_world_size() if is_distributed() else 1
    rank = torch.distributed.get_rank() if is_distributed() else 0
    mine = np.arange(rank, n_tasks, world)
    if n_jobs == 1:
        scores = np.asarray(_task_accuracies(features, sampler, mine, C, use_bias))
    else:
        import joblib

        chunks = np.array_split(mine, 4 * joblib.effective_n_jobs(n_jobs))
        work = joblib.delayed(_task_accuracies)
        scores = np.concatenate(joblib.Parallel(n_jobs=n_jobs)(work(features, sampler, chunk, C, use_bias)
                                                               for chunk in chunks if len(chunk)))
    every = np.empty(n_tasks)
    for r, part in enumerate(gather_objects(scores)):
        every[r::world] = part
    return every


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
        results[n_shots] = {name: mean_ci95(scores) for name, scores in per_split.items()}
        results[n_shots]["overall"] = mean_ci95(np.concatenate(list(per_split.values())))
    return results


# ---- in a run: the features of a split's sub-datasets, the evaluator, its metrics --------------------------

def gathered_features(model, flat: FlatDataset, session, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [M, d] (float32, whatever the run's precision) and labels of every image of `flat`, in order, on
    every rank: in a distributed run each rank encodes a shard (items r, r + world, ...) and the shards are
    gathered."""
    loader = session.loader(flat, EVAL_BATCH * session.world_size, shuffle=False)
    features, labels = extract_features(model, loader, session.device, session.progress, normalize=normalize)
    return gather_shards(features), gather_shards(labels)


class FewShotEvaluator:
    """Logistic regression on the features of one split (per sub-dataset and overall), for validation during
    training and for meta_eval. Features are extracted once per call; in a distributed run the tasks are shared
    out across ranks and their scores gathered before the intervals."""

    def __init__(self, cfg, session, split: str, n_ways: int, shots: list[int], C: float):
        self.session, self.n_ways, self.shots, self.C = session, n_ways, shots, C
        self.n_queries, self.n_tasks = cfg.n_queries, cfg.test_db_size
        self.use_bias, self.is_norm = cfg.use_bias, cfg.is_norm
        self.subsets = load_split(cfg.dataset, split)
        # Checked now, not when validation first runs (epochs later); the training scripts validate with
        # val_n_ways, sup_baseline and meta_eval with n_ways.
        ways_key = "val_n_ways" if "val_n_ways" in cfg else "n_ways"
        for sub in self.subsets:
            check_tasks_fit(sub.flat.labels, f"the {split} split of {sub.name}", n_ways, max(shots), self.n_queries,
                            ways_key, "val_n_shots")

    def __call__(self, model) -> dict[int, dict[str, tuple[float, float]]]:
        splits = {sub.name: gathered_features(model, sub.flat, self.session, self.is_norm) for sub in self.subsets}
        return evaluate_splits(splits, self.n_ways, self.shots, self.n_queries, self.n_tasks, self.C,
                               self.use_bias)


def accuracy_metrics(results, prefix: str) -> dict[str, float]:
    """`<prefix>/<k>shot` (overall mean), `..._ci95`, and with several sub-datasets `<prefix>/<k>shot/<name>`."""
    metrics = {}
    for shots, per_split in results.items():
        for name, (mean, half) in per_split.items():
            if name != "overall" and len(per_split) == 2:
                continue  # a single sub-dataset is the overall result
            key = f"{prefix}/{shots}shot" + ("" if name == "overall" else f"/{name}")
            metrics[key], metrics[f"{key}_ci95"] = mean, half
    return metrics


def best_monitors(shots: list[int]) -> dict[str, str]:
    """`best.pt` follows the first validated shot count (the next step's default); `best_<k>shot.pt` the others."""
    return {("best" if i == 0 else f"best_{k}shot"): f"val/{k}shot" for i, k in enumerate(shots)}


# ---- tables of results ---------------------------------------------------------------------------------------

def results_table(results: Mapping[str, dict[int, dict[str, tuple[float, float]]]], sub_datasets: bool = True) -> str:
    """A text table, one row per (evaluated model, sub-dataset), one column per shot count: accuracy in percent
    with its 95% interval. `results` maps a model's label to `evaluate_splits`'s output."""
    shots = sorted({k for per_model in results.values() for k in per_model})
    rows = []
    for label, per_model in results.items():
        names = [n for n in next(iter(per_model.values())) if n != "overall"] if sub_datasets else []
        if len(names) == 1:
            names = []  # one sub-dataset: its row is the overall one
        for name in names + ["overall"]:
            cells = [f"{100 * per_model[k][name][0]:6.2f} +- {100 * per_model[k][name][1]:.2f}" for k in shots]
            rows.append((f"{label} / {name}" if names else label, cells))
    width = max([len(label) for label, _ in rows] + [5])
    lines = [f"{'model':<{width}}  " + "  ".join(f"{f'{k}-shot':>15}" for k in shots)]
    lines += [f"{label:<{width}}  " + "  ".join(f"{cell:>15}" for cell in cells) for label, cells in rows]
    return "\n".join(lines)


def read_results(path) -> dict[int, dict[str, tuple[float, float]]]:
    """The results of a meta_eval run (its results.json), as `evaluate_splits` gave them."""
    import json

    saved = json.loads(open(path).read())["results"]
    return {int(k): {name: (v["mean"], v["ci95"]) for name, v in per.items()} for k, per in saved.items()}
