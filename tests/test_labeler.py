"""The labeler: recovery of synthetic classes, the pass and the whole clustering against straightforward loops,
pruning, labelling, report, error advice."""
import numpy as np
import pytest
import torch

from engine.errors import UserError
from methods.labeler import (assign_tasks, class_means, cluster, initial_centroids, labeler_pass, labeler_report,
                             load_centroids, prune_mask, pseudo_labels, save_centroids, stack_domains)


def random_tasks(labels, n_tasks, n_ways, per_class, rng):
    """Random flat tasks: n_ways classes, per_class images of each (indices [T, N, S]) and their classes [T, N]."""
    members = [np.flatnonzero(labels.numpy() == c) for c in range(int(labels.max()) + 1)]
    classes = np.stack([rng.choice(len(members), n_ways, replace=False) for _ in range(n_tasks)])
    tasks = np.stack([[rng.choice(members[c], per_class, replace=False) for c in row] for row in classes])
    return torch.from_numpy(tasks), torch.from_numpy(classes)


def gaussian_domains(n_classes=8, n_tasks=100, dim=256, spread=3.0, n_ways=4, per_class=10, seed=0):
    """Two sub-datasets of Gaussian classes (unit-variance means, isotropic noise `spread`; 60 images a class)
    whose class ids overlap (both start at 0), seen through random tasks: features, tasks, classes, domain."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    features, tasks, classes = [], [], []
    for _ in range(2):
        labels = torch.arange(n_classes).repeat_interleave(60)
        features.append(torch.randn(n_classes, dim, generator=g)[labels]
                        + spread * torch.randn(len(labels), dim, generator=g))
        domain_tasks, domain_classes = random_tasks(labels, n_tasks, n_ways, per_class, rng)
        tasks.append(domain_tasks)
        classes.append(domain_classes)
    all_features, all_tasks, domain = stack_domains(features, tasks)
    return all_features, all_tasks, torch.cat(classes), domain


def test_recovers_well_separated_gaussian_classes():
    # One fixed draw. The algorithm itself (as the original) is not exact on every draw: in this regime it finds
    # exactly 16 clusters on 38 of 40 seeds; otherwise it merges or keeps a duplicate.
    features, tasks, classes, domain = gaussian_domains()
    keys = class_means(features, tasks)
    result = cluster(keys, n_centroids=64, std_factor=3.5, seed=0)
    assignment, accepted = assign_tasks(keys, result.centroids)
    report = labeler_report(assignment, accepted, classes, domain, ["a", "b"], len(result.centroids), 10)
    assert len(result.centroids) == 16 == report["true_classes"] == report["clusters"]
    assert report["accuracy"] >= 0.95 and report["nmi"] >= 0.95
    for scores in report["domains"].values():
        assert scores["true_classes"] == 8 and scores["accuracy"] >= 0.95
    assert sum(report["cluster_sizes"]) == int(accepted.sum()) * 4 * 10
    assert result.passes[-1]["centroids_before"] == result.passes[-1]["centroids_after"] == 16


def straightforward_pass(keys, centroids, counts, ties=None):
    """The pass written out key by key and centroid by centroid (numpy float64): returns centroids, counts, hits.
    `ties` (a list) collects the keys whose smallest distance is shared by several centroids."""
    keys, centroids = np.asarray(keys, np.float64), np.array(centroids, np.float64)
    counts, hits = np.array(counts), np.zeros(len(centroids), dtype=np.int64)
    for task in keys:
        nearest = []
        for key in task:
            distances = [float(((key - c) ** 2).sum()) for c in centroids]
            nearest.append(distances.index(min(distances)))  # the first centroid on ties
            if ties is not None and distances.count(min(distances)) > 1:
                ties.append(key)
        if len(set(nearest)) < len(nearest):
            continue
        for key, j in zip(task, nearest):
            n = float(counts[j])
            centroids[j] = centroids[j] * (n / (n + 1)) + key / (n + 1)
            counts[j] += 1
            hits[j] += 1
    return centroids, counts, hits


def assert_pass_equals_straightforward(keys, centroids, counts):
    got = labeler_pass(keys, centroids, counts)
    expected = straightforward_pass(keys.numpy(), centroids.numpy(), counts.numpy())
    for value, want in zip(got, expected):  # same centroids bit for bit, same counts and hits
        assert np.array_equal(value.numpy(), want)
    return got


def test_pass_equals_a_straightforward_loop():
    # Overlapping classes in few dimensions: many collisions (skipped tasks) and many moves of the same centroid.
    features, tasks, _, _ = gaussian_domains(n_tasks=60, dim=12, spread=4.0)
    keys = class_means(features, tasks)
    centroids = initial_centroids(keys, 40)
    counts = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(0))
    _, _, hits = assert_pass_equals_straightforward(keys, centroids, counts)
    assert 0 < hits.sum() < 4 * len(keys)  # some tasks matched, some skipped


def test_pass_settles_exact_ties_on_the_first_centroid():
    # One image per class and binary features: many exactly tied distances (exact in float64 whatever the summation
    # order), several passes.
    g = torch.Generator().manual_seed(3)
    features = torch.randint(0, 2, (200, 8), generator=g).float()
    tasks = torch.randperm(200, generator=g)[:180].view(45, 4, 1)
    keys = class_means(features, tasks)
    centroids = initial_centroids(keys, 16)
    counts = torch.zeros(16, dtype=torch.long)
    ties = []
    straightforward_pass(keys.numpy(), centroids.numpy(), counts.numpy(), ties)
    assert len(ties) >= 10  # keys with several nearest centroids in the first pass
    for _ in range(3):
        centroids, counts, _ = assert_pass_equals_straightforward(keys, centroids, counts)


def test_pass_is_sequential():
    # 1-d, one class per task. Task 0's key 9 replaces centroid 1 (10 -> 9: its first match); task 1's key 4.6 is
    # nearer centroid 0 at the pass's start (4.6 against 5.4) but nearer centroid 1's new value (4.4).
    keys = torch.tensor([[[9.0]], [[4.6]]], dtype=torch.float64)
    centroids = torch.tensor([[0.0], [10.0]], dtype=torch.float64)
    new_centroids, counts, hits = labeler_pass(keys, centroids, torch.zeros(2, dtype=torch.long))
    assert counts.tolist() == hits.tolist() == [0, 2]
    assert new_centroids[:, 0].tolist() == [0.0, pytest.approx(6.8)]


def test_pass_equals_a_straightforward_loop_on_random_small_cases():
    # Few dimensions and centroids: collisions, near and exact ties (binary keys), one to five ways.
    rng = np.random.default_rng(0)
    for case in range(100):
        n_ways, n_centroids = int(rng.integers(1, 6)), int(rng.integers(1, 40))
        n_tasks, dim = int(rng.integers(1, 40)), int(rng.integers(1, 8))
        if case % 2:
            keys = rng.integers(0, 2, (n_tasks, n_ways, dim)).astype(np.float64)
            centroids = rng.integers(0, 2, (n_centroids, dim)).astype(np.float64)
        else:
            keys, centroids = rng.normal(size=(n_tasks, n_ways, dim)), rng.normal(size=(n_centroids, dim))
        assert_pass_equals_straightforward(torch.from_numpy(keys), torch.from_numpy(centroids),
                                           torch.from_numpy(rng.integers(0, 4, n_centroids)))


def straightforward_clustering(keys, n_centroids, std_factor, seed):
    """Init, passes, the binomial pruning rule and the final labels, written out from their definitions."""
    rng = np.random.default_rng(seed)
    n_tasks, n_ways, dim = keys.shape
    centroids = keys[rng.permutation(n_tasks)][:n_centroids // n_ways].reshape(n_centroids, dim)
    counts = np.zeros(n_centroids, dtype=np.int64)
    while True:
        centroids, counts, hits = straightforward_pass(keys[rng.permutation(n_tasks)], centroids, counts)
        successes, p = hits.sum() / n_ways, n_ways / len(hits)
        threshold = max(hits.mean() - std_factor * np.sqrt(successes * p * (1 - p)), 1)
        keep = hits > threshold
        centroids, counts = centroids[keep], counts[keep]
        if keep.all():
            break
    nearest = np.array([[int(np.argmin(((centroids - key) ** 2).sum(1))) for key in task] for task in keys])
    accepted = np.array([len(set(row)) == n_ways for row in nearest])
    return centroids, counts, nearest, accepted


@pytest.mark.parametrize("dim,spread,passes", [(64, 3.0, 4), (16, 4.0, 2)])
def test_whole_clustering_and_labels_equal_a_straightforward_computation(dim, spread, passes):
    # Separated classes: pruned over several passes; overlapping ones: some tasks rejected at the end.
    features, tasks, _, _ = gaussian_domains(n_tasks=60, dim=dim, spread=spread, seed=1)
    keys = class_means(features, tasks)
    result = cluster(keys, 48, 3.5, seed=1)
    centroids, counts, nearest, accepted = straightforward_clustering(keys.numpy(), 48, 3.5, seed=1)
    assert len(result.passes) == passes and result.passes[0]["centroids_after"] < 48
    assert np.array_equal(result.centroids.numpy(), centroids) and np.array_equal(result.counts.numpy(), counts)
    assignment, got_accepted = assign_tasks(keys, result.centroids)
    assert np.array_equal(assignment.numpy(), nearest) and np.array_equal(got_accepted.numpy(), accepted)
    assert accepted.sum() > 0 and (accepted.all() if spread == 3.0 else not accepted.all())
    images, labels, n_cls = pseudo_labels(tasks, assignment, got_accepted)
    kept = tasks.numpy()[accepted]
    assert np.array_equal(images.numpy(), kept.reshape(-1))
    expected = np.repeat(nearest[accepted], tasks.shape[2]) - nearest[accepted].min()
    assert np.array_equal(labels.numpy(), expected) and n_cls == expected.max() + 1


def test_initial_centroids_fill_in_task_order():
    keys = torch.arange(4 * 2 * 3, dtype=torch.float64).view(4, 2, 3)
    torch.testing.assert_close(initial_centroids(keys, 6), keys[:3].reshape(6, 3))
    with pytest.raises(UserError, match="only 4 tasks"):
        initial_centroids(keys, 10)


def test_prune_binomial_rule():
    # 10 successes of 2-way tasks over K=5: p = 0.4, std = sqrt(10 * 0.4 * 0.6) = 1.549, mean hits = 4.
    hits = torch.tensor([8, 5, 4, 2, 1])
    assert prune_mask(hits, 2, std_factor=1.0).tolist() == [True, True, True, False, False]  # thr 2.45
    assert prune_mask(hits, 2, std_factor=3.5).tolist() == [True, True, True, True, False]  # thr max(-1.4, 1)


def test_labels_of_accepted_tasks():
    centroids = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    keys = torch.tensor([[[9.0, 1.0], [1.0, 9.0]],  # -> 1, 2: accepted
                         [[1.0, 1.0], [2.0, 2.0]],  # -> 0, 0: rejected
                         [[10.0, 9.0], [9.0, 0.0]]], dtype=torch.float64)  # -> 3, 1: accepted
    assignment, accepted = assign_tasks(keys, centroids)
    assert assignment.tolist() == [[1, 2], [0, 0], [3, 1]] and accepted.tolist() == [True, False, True]
    tasks = torch.arange(3 * 2 * 2).view(3, 2, 2)
    images, labels, n_cls = pseudo_labels(tasks, assignment, accepted)
    assert images.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 0, 0] and n_cls == 3  # centroid ids 1..3 shifted to 0..2
    with pytest.raises(UserError, match=r"rejected every task .*: raise K or std_factor \(a higher std_factor "
                                         r"prunes less\)"):
        pseudo_labels(tasks, assignment, torch.zeros(3, dtype=torch.bool))


def test_a_collapse_advises_raising_std_factor():
    # Identical class means: every task's keys share one nearest centroid, no task matches, everything is pruned.
    keys = torch.zeros(20, 2, 3, dtype=torch.float64)
    with pytest.raises(UserError, match=r"pruned down to 0 centroids, fewer than n_ways=2: raise std_factor "
                                         r"\(now 3.5; a higher value prunes less\) or raise K"):
        cluster(keys, 10, 3.5)
    # The advice points the right way: a higher std_factor lowers the threshold and keeps more centroids.
    hits = torch.tensor([9, 6, 4, 3, 2, 1])
    assert prune_mask(hits, 2, std_factor=0.5).sum() < prune_mask(hits, 2, std_factor=1.5).sum()


def test_report_keeps_domains_apart():
    # Domain 0 and domain 1 both use class ids 0 and 1; cluster 0 holds class 0 of both domains.
    assignment = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 0]])
    accepted = torch.tensor([True, True, True, False])
    classes = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    domain = torch.tensor([0, 0, 1, 1])
    report = labeler_report(assignment, accepted, classes, domain, ["x", "y"], n_centroids=4, images_per_class=3)
    assert report["domains"]["x"] == {"accuracy": 1.0, "nmi": 1.0, "true_classes": 2, "clusters": 2,
                                      "rejected_tasks": 0.0}
    assert report["domains"]["y"]["accuracy"] == 0.5 and report["domains"]["y"]["rejected_tasks"] == 0.5
    # Overall 4 true classes; cluster 0 holds (x,0) twice and (y,0) once: as (x,0), the (y,0) pair is wrong.
    assert report["true_classes"] == 4 and report["clusters"] == 3
    assert report["accuracy"] == pytest.approx(5 / 8)
    assert report["cluster_sizes"] == [9, 6, 3, 0] and report["rejected_tasks"] == 0.25


def test_centroids_file_roundtrip_and_errors(tmp_path):
    centroids = torch.randn(6, 4, dtype=torch.float64)
    path = save_centroids(tmp_path / "centroids.pt", centroids, n_ways=3, std_factor=3.5)
    loaded, metadata = load_centroids(path, feat_dim=4)
    assert torch.equal(loaded, centroids) and metadata == {"n_ways": 3, "std_factor": 3.5}
    torch.save(centroids.float(), tmp_path / "bare.pt")  # the original's format: a bare tensor
    assert load_centroids(tmp_path / "bare.pt")[0].shape == (6, 4)
    with pytest.raises(UserError, match="does not exist"):
        load_centroids(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="4-d centroids but the backbone gives 8-d"):
        load_centroids(path, feat_dim=8)
    (tmp_path / "junk.pt").write_text("<html>")
    with pytest.raises(UserError, match="not a readable centroids file"):
        load_centroids(tmp_path / "junk.pt")
