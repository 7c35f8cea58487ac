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

The pass is sequential (each success moves centroids the next task sees). `labeler_pass` scores a block of tasks
against all centroids in one float32 matmul, guesses the block's decisions and checks them all at once against the
centroids as the guessed successes before each task move them; the confirmed tasks are committed and the rest
checked again. Near ties are settled by the plain loop's float64 `cdist`. It makes the same decisions, and the
same float64 centroids bit for bit, as the plain loop `reference_pass`, several times faster. Centroids are
float64, on the CPU.
"""
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from engine.checkpoint import save_checkpoint
from engine.errors import UserError

log = logging.getLogger("metalabel")

PASS_BLOCK = 24  # tasks per block: larger amortises the matmul and the checks, smaller has less to re-check


def stack_domains(features: list[torch.Tensor], tasks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
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
    if n_centroids % n_ways:
        raise UserError(f"K={n_centroids} centroids is not a multiple of n_ways={n_ways}: set K to a multiple of it")
    needed = n_centroids // n_ways
    if needed > n_tasks:
        raise UserError(f"K={n_centroids} centroids need {needed} tasks of {n_ways} classes to start from, but there "
                        f"are only {n_tasks} tasks: lower K")
    return keys[:needed].reshape(n_centroids, dim).clone()


def _running_mean(centroids, keys, counts):
    # One formula for both passes (numpy or torch, float64), so that they round identically.
    after = counts + 1
    return centroids * (counts / after) + keys / after


def reference_pass(keys, centroids: torch.Tensor, counts: torch.Tensor):
    """One pass as a plain loop over tasks. keys: [T, N, d] in visiting order, or any iterable of the tasks' [N, d]
    keys (e.g. computed task by task from the features); centroids [K, d], counts [K] (match counts so far).
    Returns (centroids, counts, hits): hits [K] = this pass's matches per centroid."""
    centroids = centroids.to(torch.float64).clone()
    counts = counts.clone()
    hits = torch.zeros_like(counts)
    for key in keys:
        key = key.to(torch.float64)
        nearest = torch.cdist(key, centroids).argmin(1)
        if len(nearest.unique()) < len(nearest):
            continue
        n = counts[nearest].to(torch.float64).unsqueeze(1)
        centroids[nearest] = _running_mean(centroids[nearest], key, n)
        counts[nearest] += 1
        hits[nearest] += 1
    return centroids, counts, hits


def labeler_pass(keys: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor, block: int = PASS_BLOCK):
    """The same pass as `reference_pass` (same arguments, same results), fast.

    A key k's nearest centroid minimises |c|^2 - 2 k.c = [-2k, 1].[c, |c|^2]. These scores for a block of tasks
    against all centroids come from one float32 matmul. Rather than walking the block task by task (numpy calls
    per task dominate such a walk), the pass guesses all its decisions, works out what they do to the centroids
    and checks them all at once (`_FastPass.confirm`); the confirmed tasks are committed and the rest checked again
    with the decisions found, one to three rounds per block. float32 is only a screen: a decision is trusted
    only when its nearest centroid beats every other by more than float32's error bound, otherwise the plain
    loop's float64 `cdist` makes it, so every decision is the loop's. Centroids update in float64 with the loop's
    formula, each centroid's matches in order.
    """
    fast = _FastPass(keys, centroids, counts)
    for start in range(0, len(keys), block):
        fast.block(start, min(start + block, len(keys)))
    hits = (fast.counts - fast.start_counts).astype(np.int64)  # each centroid's matches in this pass
    return (torch.from_numpy(fast.centroids), torch.from_numpy(fast.counts.astype(np.int64)),
            torch.from_numpy(hits))


# The pass's matmuls go through torch, whose threads also serve the class means and `cdist`: numpy's BLAS has
# threads of its own that busy-wait after each call and fight torch's for a few cores (many times slower on 2).
# oneDNN's float32 matmul is about twice MKL's speed where MKL skips AVX-512 (AMD CPUs); it costs more per call.
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.aten, "mkldnn_linear")


def _scores(key_form: np.ndarray, centroid_form: np.ndarray) -> np.ndarray:
    """key_form @ centroid_form.T in float32 (any float32 matmul does: the scores are screened with its error
    bound, see `_FastPass`)."""
    keys, centroids = torch.from_numpy(key_form), torch.from_numpy(centroid_form)
    if _ONEDNN and len(keys) * len(centroids) >= 16384:
        return torch.ops.aten.mkldnn_linear(keys.to_mkldnn(), centroids).to_dense().numpy()
    return (keys @ centroids.T).numpy()


def _score_form(centroids: np.ndarray) -> np.ndarray:
    """[c, |c|^2] in float32, one row per centroid (the keys' side is [-2k, 1])."""
    form = np.empty((len(centroids), centroids.shape[1] + 1), dtype=np.float32)
    form[:, :-1] = centroids
    form[:, -1] = np.einsum("kd,kd->k", centroids, centroids)
    return form


def _two_smallest(scores: np.ndarray):
    """Per row: the smallest entry's column and value, and the second smallest value (inf with one column)."""
    rows = np.arange(len(scores))
    nearest = scores.argmin(1)
    best = scores[rows, nearest]
    scores[rows, nearest] = np.inf  # masked in place and restored: cheaper than a copy
    runner_up = scores.min(1)
    scores[rows, nearest] = best
    return nearest, best, runner_up


class _Moves(NamedTuple):
    """What guessed decisions of a run of tasks do: their matches, sorted by centroid and then by task."""
    centroid: np.ndarray  # [M] the matched centroid
    row: np.ndarray  # [M] the matched key, as a row of the run
    task: np.ndarray  # [M] its task in the run
    rank: np.ndarray  # [M] how many matches of the same centroid come before it in the run
    values: np.ndarray  # [M, d] float64: the centroid's value after the match
    form: np.ndarray  # [M, d + 1] the same in score form
    scores: np.ndarray  # [rows of the run, M] every key of the run against each value


class _FastPass:
    """`labeler_pass`'s state: keys (rows, task-major) and centroids in float64, the decisions' precision, and in
    float32 score form.

    Why the checked decisions are the loop's: a task's decision depends on earlier tasks only through the centroids
    they moved. The first task of a round sees current scores, so its decision is exact. Each later task is checked
    against the centroids as the guessed decisions before it leave them; if those guesses are the loop's decisions,
    so is its checked decision, and by induction every task up to the first one whose check disagrees with its
    guess (or cannot decide) is confirmed. That one starts the next round, with current scores."""

    def __init__(self, keys: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor):
        _, self.n_ways, dim = keys.shape
        self.keys = keys.detach().cpu().to(torch.float64).numpy().reshape(-1, dim)
        self.centroids = centroids.detach().cpu().to(torch.float64).numpy().copy()
        self.start_counts = counts.cpu().numpy().astype(np.float64)  # exact small integers; float saves casts
        self.counts = self.start_counts.copy()
        self.key_form = np.ones((len(self.keys), dim + 1), dtype=np.float32)
        np.multiply(self.keys, -2.0, out=self.key_form[:, :dim], casting="same_kind")
        self.centroid_form = _score_form(self.centroids)
        # |float32 score - exact| <= (dim + 4) u (|k| + |c|)^2 with u = eps / 2 (dot products of length dim,
        # inputs rounded to float32), so two scores closer than 2 (dim + 4) u (...)^2 may be misordered; the slack
        # is twice that. Running means stay in the ball holding the keys and the initial centroids: |c| <= radius.
        key_norms = np.sqrt(np.einsum("rd,rd->r", self.keys, self.keys))
        radius = max(key_norms.max(initial=0), np.sqrt(self.centroid_form[:, dim].max()))
        self.slack = (2 * (dim + 4) * np.finfo(np.float32).eps * (key_norms + radius) ** 2).astype(np.float32)

    def block(self, start: int, stop: int):
        """Tasks start..stop-1. Each round guesses the decisions of the tasks left (first the float32 nearest
        centroids, then the decisions the last check found), checks them, commits the confirmed tasks and brings
        the scores of the rest up to date."""
        n = self.n_ways
        scores = _scores(self.key_form[start * n:stop * n], self.centroid_form)  # current for task `start`
        guess = None
        while start < stop:
            left = scores[len(scores) - (stop - start) * n:]
            nearest, best, runner_up = _two_smallest(left)
            if guess is None:
                guess = nearest.reshape(-1, n).copy()
            guess[0] = self.first_task(start, nearest[:n], best[:n], runner_up[:n])
            moves = self.moves(start, guess)
            decided, confirmed = self.confirm(start, guess, moves, left, nearest, best, runner_up)
            moved, later_scores = self.commit(moves, confirmed)
            left[confirmed * n:, moved] = later_scores
            guess = decided.reshape(-1, n)[confirmed:]
            start += confirmed

    def first_task(self, task: int, nearest, best, runner_up):
        """The nearest centroids of a task whose scores are current: the float32 ones, or, where a runner-up is
        within the slack, the plain loop's (its float64 `cdist`, which also settles exact ties its way)."""
        rows = slice(task * self.n_ways, (task + 1) * self.n_ways)
        if (runner_up > best + self.slack[rows]).all():
            return nearest
        return torch.cdist(torch.from_numpy(self.keys[rows]), torch.from_numpy(self.centroids)).argmin(1).numpy()

    def moves(self, start: int, guess: np.ndarray) -> _Moves:
        """The matches of the tasks of `guess` [R, N] (tasks start..start+R-1) whose N centroids are distinct, and
        the centroid values they lead to: the loop's running means, step r done for every centroid's r-th match
        at once."""
        n = self.n_ways
        ordered = np.sort(guess, 1)
        success = (ordered[:, 1:] != ordered[:, :-1]).all(1)
        row = np.flatnonzero(np.repeat(success, n))
        row = row[np.argsort(guess.reshape(-1)[row], kind="stable")]
        centroid = guess.reshape(-1)[row]
        index = np.arange(len(row))
        rank = index - np.maximum.accumulate(np.where(np.diff(centroid, prepend=-1) != 0, index, 0))
        values = np.empty((len(row), self.keys.shape[1]))
        for r in range(rank.max(initial=-1) + 1):
            at = np.flatnonzero(rank == r)
            j = centroid[at]
            before = self.centroids[j] if r == 0 else values[at - 1]
            values[at] = _running_mean(before, self.keys[start * n + row[at]], (self.counts[j] + r)[:, None])
        form = _score_form(values)
        scores = _scores(self.key_form[start * n:(start + len(guess)) * n], form)
        return _Moves(centroid, row, row // n, rank, values, form, scores)

    def confirm(self, start: int, guess, moves: _Moves, scores, nearest, best, runner_up):
        """Checks the guessed nearest centroids `guess` [R, N] of tasks start..start+R-1 (the first task's are
        exact) in one go, against their current `scores`, its `_two_smallest` and the guesses' `moves`.

        A key's scores against the centroids not moved before its task are `scores`: the best of them is `best`
        if `nearest` has not moved, and at least `runner_up` otherwise. Against the moved ones, they are the
        scores of the centroids' current values in `moves`. A key is decided when its best candidate beats every
        other by the slack, so its decision is the loop's if the guesses before it are.

        Returns the keys' decisions and the number of leading tasks confirmed: the first task whose decision
        differs from the guess or is undecided stops it (the first task is always confirmed)."""
        n = self.n_ways
        n_tasks = len(guess)
        slack = self.slack[start * n:(start + n_tasks) * n]
        if len(moves.centroid):
            task, first = moves.task, moves.rank == 0
            until = np.full(len(task), n_tasks)  # the task that moves the same centroid again
            until[:-1] = np.where(first[1:], n_tasks, task[1:])
            row_task = (np.arange(len(scores)) // n)[:, None]
            moved_scores = np.where((task < row_task) & (row_task <= until), moves.scores, np.inf)
            pick = moved_scores.argmin(1)
            moved_best = moved_scores[np.arange(len(scores)), pick]
            moved_decided = np.count_nonzero(moved_scores <= (moved_best + slack)[:, None], axis=1) == 1
            moved_nearest = moves.centroid[pick]
            first_moved = np.full(len(self.centroids), n_tasks)
            first_moved[moves.centroid[first]] = task[first]
            nearest_moved = first_moved[nearest] < row_task[:, 0]
        else:  # no guessed success: nothing moves
            moved_best = np.full(len(scores), np.inf, dtype=np.float32)
            moved_nearest, moved_decided, nearest_moved = nearest, True, False
        take_moved = moved_best + slack < np.where(nearest_moved, runner_up, best)
        decided = np.where(take_moved, moved_nearest, nearest)
        certain = np.where(take_moved, moved_decided,
                           ~nearest_moved & (best + slack < np.minimum(runner_up, moved_best)))
        stops = (~certain | (decided != guess.reshape(-1))).reshape(n_tasks, n).any(1)
        stops[0] = False
        return decided, int(stops.argmax()) if stops.any() else n_tasks

    def commit(self, moves: _Moves, confirmed: int):
        """Applies the matches of the first `confirmed` tasks of the run: each centroid takes its value after its
        last one. Returns the moved centroids and the later keys' scores against their new values."""
        done = moves.task < confirmed
        last = done.copy()
        last[:-1] &= ~(done[1:] & (moves.rank[1:] > 0))  # the next match is of the same centroid and done too
        moved = moves.centroid[last]
        self.centroids[moved] = moves.values[last]
        self.counts[moved] += moves.rank[last] + 1
        self.centroid_form[moved] = moves.form[last]
        return moved, moves.scores[confirmed * self.n_ways:, last]


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


def cluster(keys: torch.Tensor, n_centroids: int, std_factor: float, seed: int = 0,
            pass_fn: Callable = labeler_pass) -> Clustering:
    """Steps 1-4 above on keys [T, N, d]. The init order and each pass's order are permutations drawn from
    `np.random.default_rng(seed)`, so a run is repeatable. `pass_fn=reference_pass` runs the plain loop."""
    rng = np.random.default_rng(seed)
    n_tasks, n_ways, _ = keys.shape
    keys = keys.detach().cpu().to(torch.float64).numpy()
    centroids = initial_centroids(torch.from_numpy(keys[rng.permutation(n_tasks)]), n_centroids)
    counts = torch.zeros(n_centroids, dtype=torch.long)
    result = Clustering(centroids, counts)
    while True:
        order = rng.permutation(n_tasks)
        centroids, counts, hits = pass_fn(torch.from_numpy(keys[order]), centroids, counts)
        keep = prune_mask(hits, n_ways, std_factor)
        stats = {"pass": len(result.passes), "centroids_before": len(centroids), "centroids_after": int(keep.sum()),
                 "success_rate": hits.sum().item() / n_ways / n_tasks}
        result.passes.append(stats)
        log.info("labeler pass {pass}: {centroids_before} -> {centroids_after} centroids, "
                 "{success_rate:.1%} of tasks matched".format(**stats))
        if stats["centroids_after"] < n_ways:
            raise UserError(f"the labeler pruned down to {stats['centroids_after']} centroids, fewer than "
                            f"n_ways={n_ways}: lower std_factor (now {std_factor}) or raise K")
        centroids, counts = centroids[keep], counts[keep]
        result.centroids, result.counts = centroids, counts
        if keep.all():
            return result


def assign_tasks(keys: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each key's nearest centroid, [T, N], and whether the task is accepted (its N centroids distinct), [T]."""
    keys = keys.detach().cpu().to(torch.float64)
    centroids = centroids.detach().cpu().to(torch.float64)
    assignment = torch.cdist(keys.flatten(0, 1), centroids).argmin(1).view(keys.shape[:2])
    ordered = assignment.sort(1).values
    return assignment, (ordered[:, 1:] != ordered[:, :-1]).all(1)


def pseudo_labels(tasks: torch.Tensor, assignment: torch.Tensor, accepted: torch.Tensor):
    """Per-image labels of the accepted tasks: (image indices [n], labels [n], n_cls). An image takes the centroid
    id of its task class, minus the smallest id in use (ids may have gaps, as the reference)."""
    if not accepted.any():
        raise UserError("the labeler rejected every task (no task matched distinct centroids): raise K or lower "
                        "std_factor")
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


def plot_cluster_sizes(report: dict, path: Path) -> Path:
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
    return Path(path)


def save_centroids(path: Path, centroids: torch.Tensor, **metadata) -> Path:
    """Centroids [K, d] (float64) with metadata (plain values: n_ways, std_factor, backbone checkpoint...)."""
    save_checkpoint(Path(path), {"centroids": centroids.detach().cpu(), "metadata": metadata})
    return Path(path)


def load_centroids(path: Path, feat_dim: int | None = None) -> tuple[torch.Tensor, dict]:
    """Centroids saved by `save_centroids` (or a bare [K, d] tensor, the reference's format), checked against the
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
