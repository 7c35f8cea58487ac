"""Learning, measured: on generated data that only learned features tell apart (`dataset=synthetic_hard_fs`: each
class a random 4x4 shape at a random place of a noisy image), each MeLa step must beat an untrained network by a
wide margin on new classes, and the labels the labeler infers must train a backbone nearly as well as the true
labels (the oracle). A broken loss, labeler or evaluation fails these orderings. The library is called directly
(no scripts): a Conv-4 on 10x10 images, CPU, fixed seeds; the figures in the comments are this setting's
(shuffled inferred labels, for one, give 0.31 where the test wants above 0.7). About 12 s on one core."""
import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from train_epochs import meta_train_epoch, supervised_train_epoch

from dataset.fewshot import FlatDataset, TaskDataset, dataset_config, load_split
from engine.errors import UserError
from methods import labeler
from methods.fewshot_eval import evaluate_splits, extract_features
from methods.meta_ls import MetaLS
from methods.supervised import build_classifier
from models import create_model

SESSION = SimpleNamespace(progress=lambda iterable, desc: iterable, to_device=lambda t: t, world_size=1,
                          autocast=contextlib.nullcontext)
EPOCHS = 10
LABELER_SHOTS, LABELER_QUERIES, LABELER_K = 2, 3, 80  # small tasks: about 50 over the 1,280 train images


def backbone(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("conv4")


def batches(flat: FlatDataset, size: int, seed: int | None = None) -> list:
    order = np.arange(len(flat)) if seed is None else np.random.default_rng(seed).permutation(len(flat))
    return [flat.load(order[start:start + size]) for start in range(0, len(flat), size)]


def five_shot_accuracy(model, test: FlatDataset) -> float:
    features, labels = extract_features(model, batches(test, 200), "cpu")
    return evaluate_splits({"test": (features, labels)}, n_ways=5, shots=[5], n_queries=15, n_tasks=100)[5]["test"][0]


def supervised(train: FlatDataset) -> torch.nn.Module:
    """sup_baseline's / learn_labeler's training: cross-entropy with a linear head, SGD."""
    net = build_classifier(backbone(), train.n_cls)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for epoch in range(EPOCHS):
        supervised_train_epoch(net, batches(train, 64, seed=epoch), opt, SESSION)
    return net.backbone


def meta_learned(train: FlatDataset) -> torch.nn.Module:
    """learn_meta_repr's training: MetaLS (ridge, hinge and W_s-vs-W_* terms) on 5-way 5+5 tasks, SGD."""
    net = backbone()
    learner = MetaLS(net, n_ways=5, lam=1e-3, extra_reg=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    tasks = TaskDataset(train, n_ways=5, n_shots=5, n_queries=5, no_replacement=True, seed=0)
    for epoch in range(EPOCHS):
        order = np.random.default_rng(epoch).permutation(len(tasks))
        meta_train_epoch(learner, [tasks[int(i)] for i in order], opt, SESSION)
    return net


def inferred_labels(model, train: FlatDataset) -> tuple[FlatDataset, dict]:
    """learn_labeler's labelling: flat no-replacement tasks, class means of raw features, clustering, labels."""
    tasks = TaskDataset(train, n_ways=5, n_shots=LABELER_SHOTS, n_queries=LABELER_QUERIES, shape="flat", seed=0)
    drawn = [tasks.task_indices(i) for i in range(len(tasks))]
    indices = torch.as_tensor(np.stack([idx for _, idx in drawn]))
    true_classes = torch.as_tensor(np.stack([classes for classes, _ in drawn]))
    features, _ = extract_features(model, batches(train, 200), "cpu", normalize=False)
    keys = labeler.class_means(features, indices)
    centroids = labeler.cluster(keys, LABELER_K, std_factor=3.5, seed=0).centroids
    assignment, accepted = labeler.assign_tasks(keys, centroids)
    report = labeler.labeler_report(assignment, accepted, true_classes, torch.zeros(len(indices), dtype=torch.long),
                                    ["train"], len(centroids), LABELER_SHOTS + LABELER_QUERIES)
    images, labels, _ = labeler.pseudo_labels(indices, assignment, accepted)
    return FlatDataset(train.images[images.numpy()], labels.numpy(), train.transform), report


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    cfg = dataset_config("synthetic_hard_fs", data_dir=tmp_path_factory.mktemp("data"))
    train, test = load_split(cfg, "train")[0].flat, load_split(cfg, "test")[0].flat
    untrained = backbone()
    meta = meta_learned(train)
    relabelled, report = inferred_labels(meta, train)
    return {"untrained": five_shot_accuracy(untrained, test), "oracle": five_shot_accuracy(supervised(train), test),
            "meta": five_shot_accuracy(meta, test), "mela": five_shot_accuracy(supervised(relabelled), test),
            "labeler": report, "labeler_untrained": inferred_labels(untrained, train)[1]}


def bright_shape(image: np.ndarray) -> np.ndarray:
    """The motif of a 10x10 synthetic_hard_fs image: the bright pixels, cropped to the 4x4 cell they fill."""
    bright = image.mean(-1) > 128
    rows, cols = np.flatnonzero(bright.any(1)), np.flatnonzero(bright.any(0))
    return bright[rows[0]:rows[0] + 4, cols[0]:cols[0] + 4] if len(rows) else bright[:0, :0]


def test_motif_images_share_their_class_shape_at_random_places(tmp_path):
    cfg = dataset_config("synthetic_hard_fs", data_dir=tmp_path, **{"generate.classes.train": 3})
    flat = load_split(cfg, "train")[0].flat
    assert flat.images.shape == (3 * 40, 10, 10, 3) and flat.n_cls == 3
    for c in range(3):
        images = flat.images[flat.labels == c]
        shapes = [bright_shape(image) for image in images]
        # Noise may darken a motif pixel or brighten a background one: most images show the class's shape exactly.
        exact = [s for s in shapes if s.shape == (4, 4) and np.array_equal(s, shapes[0])]
        assert len(exact) > 30
        corners = {tuple(np.argwhere(image.mean(-1) > 128).min(0)) for image in images}
        assert len(corners) > 10  # at many places
    with pytest.raises(UserError, match="dataset.generate.kind=stripes is not one of patterns, motifs"):
        load_split(dataset_config("synthetic_hard_fs", data_dir=tmp_path, **{"generate.kind": "stripes"}), "train")


def test_the_data_needs_learned_features(measured):
    assert measured["untrained"] < 0.4  # 5-way: chance is 0.2; 0.30 here
    assert measured["oracle"] > measured["untrained"] + 0.5  # 0.98


def test_meta_learned_features_beat_untrained_ones(measured):
    assert measured["meta"] > measured["untrained"] + 0.2  # 0.69


def test_the_labeler_finds_the_classes_only_in_learned_features(measured):
    found, untrained = measured["labeler"], measured["labeler_untrained"]
    assert found["accuracy"] > 0.7 and found["accuracy"] > untrained["accuracy"] + 0.3  # 0.86 against 0.33
    assert found["nmi"] > untrained["nmi"] + 0.15  # 0.87 against 0.57


def test_inferred_labels_train_nearly_as_well_as_the_true_ones(measured):
    assert measured["mela"] > measured["oracle"] - 0.2  # 0.93 against 0.98
    assert measured["mela"] > measured["untrained"] + 0.4
    assert measured["mela"] > measured["meta"]  # pre-training on the inferred labels helps
