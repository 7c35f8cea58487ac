"""The labeler: recovery of synthetic classes, the fast pass against the plain loop, pruning, labelling, report."""
import numpy as np
import pytest
import torch

from engine.errors import UserError
from methods.labeler import (assign_tasks, class_means, cluster, initial_centroids, labeler_pass, labeler_report,
                             load_centroids, prune_mask, pseudo_labels, reference_pass, save_centroids,
                             stack_domains)


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
    # One fixed draw. The algorithm itself (as the reference) is not exact on every draw: in this regime it finds
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


@pytest.mark.parametrize("block", [1, 3, 16])
def test_fast_pass_equals_plain_loop(block):
    # Overlapping classes in few dimensions: many collisions, and many moves within a block.
    features, tasks, _, _ = gaussian_domains(n_tasks=60, dim=12, spread=4.0)
    keys = class_means(features, tasks)
    centroids = initial_centroids(keys, 40)
    counts = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(0))
    fast = labeler_pass(keys, centroids, counts, block=block)
    plain = reference_pass(keys, centroids, counts)
    assert torch.equal(fast[1], plain[1]) and torch.equal(fast[2], plain[2])
    assert 0 < fast[2].sum() < 4 * len(keys)  # some tasks matched, some skipped
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-12, atol=1e-12)


def test_fast_pass_decides_exact_ties_like_the_loop():
    # One image per class and binary features: many exactly tied distances, settled by the loop's own float64 cdist.
    g = torch.Generator().manual_seed(3)
    features = torch.randint(0, 2, (200, 8), generator=g).float()
    tasks = torch.randperm(200, generator=g)[:180].view(45, 4, 1)
    keys = class_means(features, tasks)
    centroids = initial_centroids(keys, 16)
    counts = torch.zeros(16, dtype=torch.long)
    for _ in range(3):
        fast = labeler_pass(keys, centroids, counts, block=8)
        plain = reference_pass(keys, centroids, counts)
        assert torch.equal(fast[1], plain[1]) and torch.equal(fast[2], plain[2])
        torch.testing.assert_close(fast[0], plain[0], rtol=1e-12, atol=1e-12)
        centroids, counts = fast[0], fast[1]


def test_fast_pass_rechecks_a_decision_changed_within_its_block():
    # 1-d, one class per task. Task 0's key 9 replaces centroid 1 (10 -> 9: its first match); task 1's key 4.6 was
    # nearer centroid 0 at the block's start (4.6 against 5.4) but is nearer centroid 1's new value (4.4).
    keys = torch.tensor([[[9.0]], [[4.6]]], dtype=torch.float64)
    centroids = torch.tensor([[0.0], [10.0]], dtype=torch.float64)
    counts = torch.zeros(2, dtype=torch.long)
    fast = labeler_pass(keys, centroids, counts, block=2)
    plain = reference_pass(keys, centroids, counts)
    assert fast[1].tolist() == plain[1].tolist() == [0, 2]
    assert torch.equal(fast[0], plain[0]) and fast[0][1, 0].item() == pytest.approx(6.8)


def test_fast_pass_equals_plain_loop_on_random_small_cases():
    # Few dimensions and centroids, any block size: collisions, re-checks, near and exact ties (binary keys), and
    # both of cdist's paths (K <= 25 and K > 25). Same counts and hits, and the same centroids bit for bit.
    rng = np.random.default_rng(0)
    for case in range(100):
        n_ways, n_centroids = int(rng.integers(1, 6)), int(rng.integers(1, 40))
        n_tasks, dim = int(rng.integers(1, 40)), int(rng.integers(1, 8))
        if case % 2:
            keys = rng.integers(0, 2, (n_tasks, n_ways, dim)).astype(np.float64)
            centroids = rng.integers(0, 2, (n_centroids, dim)).astype(np.float64)
        else:
            keys, centroids = rng.normal(size=(n_tasks, n_ways, dim)), rng.normal(size=(n_centroids, dim))
        args = torch.from_numpy(keys), torch.from_numpy(centroids), torch.from_numpy(rng.integers(0, 4, n_centroids))
        fast, plain = labeler_pass(*args, block=int(rng.integers(1, 50))), reference_pass(*args)
        assert all(torch.equal(a, b) for a, b in zip(fast, plain)), case


def test_whole_clustering_equals_plain_loop():
    features, tasks, _, _ = gaussian_domains(n_tasks=60, dim=64, seed=1)
    keys = class_means(features, tasks)
    fast = cluster(keys, 48, 3.5, seed=1)
    plain = cluster(keys, 48, 3.5, seed=1, pass_fn=reference_pass)
    assert len(fast.passes) > 1
    assert fast.passes == plain.passes and torch.equal(fast.counts, plain.counts)
    torch.testing.assert_close(fast.centroids, plain.centroids, rtol=1e-12, atol=1e-12)
    assert torch.equal(assign_tasks(keys, fast.centroids)[0], assign_tasks(keys, plain.centroids)[0])


def test_initial_centroids_fill_in_task_order():
    keys = torch.arange(4 * 2 * 3, dtype=torch.float64).view(4, 2, 3)
    torch.testing.assert_close(initial_centroids(keys, 6), keys[:3].reshape(6, 3))
    with pytest.raises(UserError, match="K=5 .* n_ways=2"):
        initial_centroids(keys, 5)
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
    with pytest.raises(UserError, match="rejected every task"):
        pseudo_labels(tasks, assignment, torch.zeros(3, dtype=torch.bool))


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
    torch.save(centroids.float(), tmp_path / "bare.pt")  # the reference's format: a bare tensor
    assert load_centroids(tmp_path / "bare.pt")[0].shape == (6, 4)
    with pytest.raises(UserError, match="does not exist"):
        load_centroids(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="4-d centroids but the backbone gives 8-d"):
        load_centroids(path, feat_dim=8)
    (tmp_path / "junk.pt").write_text("<html>")
    with pytest.raises(UserError, match="not a readable centroids file"):
        load_centroids(tmp_path / "junk.pt")
