"""MeLa's labeler (MetaLabeler): infers global labels for tasks that only carry local ones.

It works on features: the images are encoded once by the frozen meta-learned backbone, and a task is an index
array [N, S] into them (N classes, S = K+Q images each). A task's N "keys" are its per-class mean features.

1. Init: the keys of the first K/N tasks (of a shuffled order) are the K initial centroids (K % N == 0).
2. A pass visits all tasks in a new shuffled order. Each key goes to its nearest centroid (Euclidean); if the N
   nearest centroids are distinct the task succeeds and each of them becomes the running mean
   c <- c n/(n+1) + key/(n+1) of its matched keys (n: the centroid's match count, never reset, so the first match
   replaces the init value); otherwise the task is skipped.
3. After each pass, prune with a binomial rule on this pass's hits h (T successes, p = N/K):
   keep h > max(mean(h) - std_factor sqrt(T p (1-p)), 1).
4. Repeat passes until a pass prunes nothing. Then label: a task gets its keys' nearest centroids, or is rejected
   when two keys share one; every image of an accepted task takes its class's centroid id (shifted to start at 0).

The pass is a plain loop over tasks (each success moves centroids the next task sees), on the CPU in float64:
nearest centroids by squared Euclidean distances summed directly (no |a|^2 - 2ab + |b|^2 shortcut), the first one
on ties. Everything else (class means, the final assignment, pruning) works on all tasks at once. At miniImageNet
scale a whole clustering takes about a second, well under 1% of learn_labeler's step (see docs/mela_fidelity.md).
"""
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.checkpoint import save_checkpoint
from engine.errors import UserError
from engine.settings import NON_NEGATIVE, POSITIVE_INT, AnyOf, Boolean, Null, Text, setting

log = logging.getLogger("metalabel")


def _positive_multiple_of_ways(cfg) -> str | None:
    K, n_ways = cfg.K, cfg.n_ways
    if K % n_ways:
        nearest = max(n_ways, round(K / n_ways) * n_ways)
        return f"K={K}: K must be a positive multiple of n_ways={n_ways} (e.g. K={nearest})"


@dataclass
class LabelerSettings:
    """The labeler (learn_labeler) and the training on its labels."""

    pretrained_centroids: object = setting(None, AnyOf((Null("cluster the features"), Text("a centroids file"))),
                                           "a centroids.pt (or the original's tensor file): skip clustering")
    K: int = setting(400, POSITIVE_INT, "initial centroids (a multiple of n_ways; learn_labeler takes the "
                                        "dataset's labeler.K)")
    std_factor: float = setting(3.5, NON_NEGATIVE, "pruning: keep centroids with hits > mean - std_factor * "
                                "binomial std")
    sup_data_aug: bool = setting(True, Boolean(), "augmentation of the training on the inferred labels")
    sup_rotate_aug: bool = setting(True, Boolean(), "x4 rotations, label + n_cls * rotation")

    relations = (_positive_multiple_of_ways,)


def stack_domains(features: list[torch.Tensor], tasks: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Per sub-dataset features [M_i, d] and tasks [T_i, N, S] (local indices) -> all features, tasks indexing
    them, and each task's sub-dataset number [T]."""
    offsets = np.cumsum([0] + [len(f) for f in features[:-1]])
    all_tasks = torch.cat([t.long() + int(o) for t, o in zip(tasks, offsets)])
    domain = torch.cat([torch.full((len(t),), i, dtype=torch.long) for i, t in enumerate(tasks)])
    return torch.cat(features), all_tasks, domain


def class_means(features: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    """Keys [T, N, d] (float64, CPU): the mean feature of each task class, averaged in the features' precision in
    one fused gather-and-mean. features [M, d], tasks [T, N, S] (indices into features)."""
    n_tasks, n_ways, size = tasks.shape
    bags = tasks.reshape(-1, size).to(features.device)
    means = F.embedding_bag(bags, features.detach(), mode="mean")
    return means.view(n_tasks, n_ways, -1).cpu().to(torch.float64)


def initial_centroids(keys: torch.Tensor, n_centroids: int) -> torch.Tensor:
    """The keys of the first n_centroids / N tasks, in order: [n_centroids, d]."""
    n_tasks, n_ways, dim = keys.shape
    needed = n_centroids // n_ways
    if needed > n_tasks:
        raise UserError(f"K={n_centroids} centroids need {needed} tasks of {n_ways} classes to start from, but there "
                        f"are only {n_tasks} tasks: lower K")
    return keys[:needed].reshape(n_centroids, dim).clone()


def nearest_centroids(keys: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each key's nearest centroid: keys [n, d], centroids [K, d] (float64 arrays) -> [n]. Squared Euclidean
    distances summed directly (scipy; exact for exactly representable values), the first centroid on ties."""
    from scipy.spatial.distance import cdist  # imported when first needed: scripts start faster

    return cdist(keys, centroids, "sqeuclidean").argmin(1)


def labeler_pass(keys: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor):
    """One pass over the tasks, in order. keys [T, N, d]; centroids [K, d]; counts [K], the match counts so far.
    A task whose N keys have distinct nearest centroids moves each of them to the running mean
    c n/(n+1) + key/(n+1); any other task is skipped. Returns (centroids, counts, hits): float64 centroids, the
    updated counts and hits [K] = this pass's matches per centroid."""
    keys = keys.detach().cpu().to(torch.float64).numpy()
    centroids = centroids.detach().cpu().to(torch.float64).numpy().copy()
    before = counts.cpu().numpy()
    counts = before.copy()
    for key in keys:
        nearest = nearest_centroids(key, centroids)
        if len(np.unique(nearest)) < len(nearest):
            continue
        n = counts[nearest, None].astype(np.float64)
        centroids[nearest] = centroids[nearest] * (n / (n + 1)) + key / (n + 1)
        counts[nearest] += 1
    return torch.from_numpy(centroids), torch.from_numpy(counts), torch.from_numpy(counts - before)


def prune_mask(hits: torch.Tensor, n_ways: int, std_factor: float) -> torch.Tensor:
    """Centroids to keep after a pass: hits > max(mean(hits) - std_factor * sqrt(T p (1-p)), 1), with
    T = successful tasks of the pass and p = n_ways / K, the chance of a given centroid in a random task."""
    successes = hits.sum().item() / n_ways
    p = n_ways / len(hits)
    threshold = max(hits.to(torch.float64).mean().item() - std_factor * math.sqrt(successes * p * (1 - p)), 1.0)
    return hits > threshold


@dataclass
class Clustering:
    centroids: torch.Tensor  # [K, d] float64
    counts: torch.Tensor  # [K] matches over all passes
    passes: list[dict] = field(default_factory=list)  # per pass: centroids before/after, task success rate


def cluster(keys: torch.Tensor, n_centroids: int, std_factor: float, seed: int = 0) -> Clustering:
    """Steps 1-4 above on keys [T, N, d]. The init order and each pass's order are permutations drawn from
    `np.random.default_rng(seed)`, so a run is repeatable."""
    rng = np.random.default_rng(seed)
    n_tasks, n_ways, _ = keys.shape
    keys = keys.detach().cpu().to(torch.float64).numpy()
    centroids = initial_centroids(torch.from_numpy(keys[rng.permutation(n_tasks)]), n_centroids)
    counts = torch.zeros(n_centroids, dtype=torch.long)
    result = Clustering(centroids, counts)
    while True:
        order = rng.permutation(n_tasks)
        centroids, counts, hits = labeler_pass(torch.from_numpy(keys[order]), centroids, counts)
        keep = prune_mask(hits, n_ways, std_factor)
        stats = {"pass": len(result.passes), "centroids_before": len(centroids), "centroids_after": int(keep.sum()),
                 "success_rate": hits.sum().item() / n_ways / n_tasks}
        result.passes.append(stats)
        log.info("labeler pass {pass}: {centroids_before} -> {centroids_after} centroids, "
                 "{success_rate:.1%} of tasks matched".format(**stats))
        if stats["centroids_after"] < n_ways:
            raise UserError(f"the labeler pruned down to {stats['centroids_after']} centroids, fewer than "
                            f"n_ways={n_ways}: raise std_factor (now {std_factor}; a higher value prunes less) "
                            f"or raise K")
        centroids, counts = centroids[keep], counts[keep]
        result.centroids, result.counts = centroids, counts
        if keep.all():
            return result


def assign_tasks(keys: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each key's nearest centroid, [T, N], and whether the task is accepted (its N centroids distinct), [T]."""
    keys = keys.detach().cpu().to(torch.float64)
    flat = nearest_centroids(keys.flatten(0, 1).numpy(), centroids.detach().cpu().to(torch.float64).numpy())
    assignment = torch.from_numpy(flat).view(keys.shape[:2])
    ordered = assignment.sort(1).values
    return assignment, (ordered[:, 1:] != ordered[:, :-1]).all(1)


def pseudo_labels(tasks: torch.Tensor, assignment: torch.Tensor, accepted: torch.Tensor):
    """Per-image labels of the accepted tasks: (image indices [n], labels [n], n_cls). An image takes the centroid
    id of its task class, minus the smallest id in use (ids may have gaps, as in the original)."""
    if not accepted.any():
        raise UserError("the labeler rejected every task (no task matched distinct centroids): raise K or "
                        "std_factor (a higher std_factor prunes less)")
    tasks, assignment = tasks[accepted], assignment[accepted]
    labels = assignment.unsqueeze(2).expand(tasks.shape).reshape(-1)
    labels = labels - labels.min()
    return tasks.reshape(-1), labels, int(labels.max()) + 1


def _clustering_scores(true: np.ndarray, assigned: np.ndarray, accepted: np.ndarray, n_ways: int) -> dict:
    """true/assigned class per (task, class) pair, task-major; rejected pairs count as wrong in the accuracy,
    NMI is over the accepted pairs."""
    kept_true, kept_assigned = true[accepted], assigned[accepted]
    if len(kept_true):
        # Each cluster counts as its majority true class.
        from sklearn.metrics import normalized_mutual_info_score  # imported when first needed
        from sklearn.metrics.cluster import contingency_matrix

        correct = contingency_matrix(kept_true, kept_assigned).max(0).sum()
        nmi = float(normalized_mutual_info_score(kept_true, kept_assigned))
    else:
        correct, nmi = 0, 0.0
    return {"accuracy": float(correct / len(true)), "nmi": nmi, "true_classes": len(np.unique(true)),
            "clusters": len(np.unique(kept_assigned)), "rejected_tasks": float(1 - accepted[::n_ways].mean())}


def labeler_report(assignment: torch.Tensor, accepted: torch.Tensor, true_classes: torch.Tensor,
                   task_domain: torch.Tensor, domain_names: list[str], n_centroids: int,
                   images_per_class: int) -> dict:
    """What the labeler found, per sub-dataset (`domains`) and overall: clusters in use against true classes,
    clustering accuracy (per (task, class) pair, each cluster mapped to its majority true class, rejected tasks
    wrong), NMI, share of tasks rejected; and the images per centroid (`cluster_sizes`, for a plot). Class ids are
    never compared across sub-datasets: overall, a true class is a (sub-dataset, class) pair."""
    n_ways = assignment.shape[1]
    assigned = assignment.reshape(-1).numpy()
    true = true_classes.reshape(-1).numpy()
    pair_accepted = accepted.repeat_interleave(n_ways).numpy()
    pair_domain = task_domain.repeat_interleave(n_ways).numpy()
    domains = {name: _clustering_scores(true[pair_domain == i], assigned[pair_domain == i],
                                        pair_accepted[pair_domain == i], n_ways)
               for i, name in enumerate(domain_names) if (pair_domain == i).any()}
    global_true = pair_domain * (int(true.max()) + 1) + true
    sizes = np.bincount(assigned[pair_accepted], minlength=n_centroids) * images_per_class
    return {**_clustering_scores(global_true, assigned, pair_accepted, n_ways), "centroids": n_centroids,
            "domains": domains, "cluster_sizes": sizes.tolist()}


def plot_cluster_sizes(report: dict, path: Path) -> None:
    """A bar chart of images per centroid (largest first), with the true number of classes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(report["cluster_sizes"], reverse=True)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(range(len(sizes)), sizes, width=1.0)
    ax.axvline(report["true_classes"] - 0.5, color="tab:red", linestyle="--",
               label=f"true classes: {report['true_classes']}")
    ax.set(xlabel="centroid (by size)", ylabel="images", title=f"{len(sizes)} centroids")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_centroids(path: Path, centroids: torch.Tensor, **metadata) -> Path:
    """Centroids [K, d] (float64) with metadata (plain values: n_ways, std_factor, backbone checkpoint...)."""
    save_checkpoint(Path(path), {"centroids": centroids.detach().cpu(), "metadata": metadata})
    return Path(path)


def load_centroids(path: Path, feat_dim: int | None = None) -> tuple[torch.Tensor, dict]:
    """Centroids saved by `save_centroids` (or a bare [K, d] tensor, the original's format), checked against the
    backbone's feature size."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pretrained_centroids={path} does not exist: give a centroids file written by "
                        f"learn_labeler.py, or leave pretrained_centroids unset to cluster")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise UserError(f"pretrained_centroids={path} is not a readable centroids file ({type(exc).__name__}): "
                        f"give a file written by learn_labeler.py") from None
    if isinstance(payload, dict):
        centroids, metadata = payload.get("centroids"), payload.get("metadata", {})
    else:
        centroids, metadata = payload, {}
    if not isinstance(centroids, torch.Tensor) or centroids.dim() != 2:
        raise UserError(f"pretrained_centroids={path} holds no [K, d] centroid tensor: give a file written by "
                        f"learn_labeler.py")
    if feat_dim is not None and centroids.shape[1] != feat_dim:
        raise UserError(f"pretrained_centroids={path} has {centroids.shape[1]}-d centroids but the backbone gives "
                        f"{feat_dim}-d features: use centroids from the same backbone")
    return centroids.to(torch.float64), metadata
