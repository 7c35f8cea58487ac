"""learn_labeler's first half: global labels for the train split, inferred by the labeler (methods.labeler) on the
features of a frozen meta-learned backbone. `infer_global_labels` runs, in order:

    draw_tasks           flat tasks of every sub-dataset of the train split (index sets, no images loaded)
    encode_tasks         every image encoded once by the backbone; the tasks as index sets into those features
    labeler_centroids    from pretrained_centroids, from this run's centroids.pt on resume, or by clustering
    labeler.assign_tasks, labeler.pseudo_labels, labeler.labeler_report (logged by log_report)
    inferred_dataset     the images of the accepted tasks with their inferred labels: the supervised training set
    write_labeler_files  centroids.pt, labeler.json, cluster_sizes.png
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dataset.fewshot import FlatDataset, TaskMixture, load_split, make_tasks, transform_from_config
from methods import labeler
from methods.fewshot_eval import gathered_features

CENTROIDS_FILE = "centroids.pt"
REPORT_FILE = "labeler.json"
SIZES_PLOT = "cluster_sizes.png"


@dataclass
class EncodedTasks:
    """The train split seen through the backbone: every image of every sub-dataset once, and the tasks as index
    sets into those features."""

    features: torch.Tensor  # [M, d] raw (not normalised) features, the sub-datasets one after the other
    tasks: torch.Tensor  # [T, n_ways, K+Q] indices into `features`
    task_domain: torch.Tensor  # [T] the sub-dataset of each task
    true_classes: torch.Tensor  # [T, n_ways] each task's true classes (in its sub-dataset's labels)
    offsets: np.ndarray  # [D + 1] image i of `features` is image i - offsets[d] of sub-dataset d


def draw_tasks(cfg, subsets) -> TaskMixture:
    """The labeler's tasks: flat tasks of every sub-dataset of the train split, drawn as meta-training's."""
    return make_tasks(subsets, n_ways=cfg.n_ways, n_shots=cfg.n_shots, n_queries=cfg.n_queries, shape="flat",
                      no_replacement=cfg.no_replacement, fixed_db=cfg.fixed_db, db_size=cfg.train_db_size,
                      seed=cfg.seed)


def encode_tasks(session, backbone: torch.nn.Module, subsets, tasks: TaskMixture) -> EncodedTasks:
    """Every image encoded once by the backbone (raw features, as the original), each task's indices and true
    classes; the sub-datasets stacked."""
    features, task_indices, true_classes = [], [], []
    for sub, part in zip(subsets, tasks.datasets):
        features.append(gathered_features(backbone, sub.flat, session, normalize=False)[0])
        drawn = [part.task_indices(i) for i in range(len(part))]
        true_classes.append(torch.as_tensor(np.stack([classes for classes, _ in drawn])))
        task_indices.append(torch.as_tensor(np.stack([indices for _, indices in drawn])))
    all_features, all_tasks, task_domain = labeler.stack_domains(features, task_indices)
    offsets = np.cumsum([0] + [len(f) for f in features])
    return EncodedTasks(all_features, all_tasks, task_domain, torch.cat(true_classes), offsets)


def labeler_centroids(cfg, session, keys: torch.Tensor, feat_dim: int) -> torch.Tensor:
    """`pretrained_centroids` when given, else (on resume) this run's earlier centroids.pt, else the labeler's
    clustering of the task keys."""
    saved = session.checkpoint_dir / CENTROIDS_FILE
    if cfg.pretrained_centroids:
        source, origin = Path(str(cfg.pretrained_centroids)), str(cfg.pretrained_centroids)
    elif session.resuming and saved.is_file():
        source, origin = saved, f"this run's {saved}"
    else:
        return labeler.cluster(keys, cfg.K, cfg.std_factor, cfg.seed).centroids
    centroids, _ = labeler.load_centroids(source, feat_dim)
    session.log.info(f"labeler: {len(centroids)} centroids from {origin}")
    return centroids


def log_report(session, report: dict) -> None:
    session.log.info(f"labeler: {report['clusters']} clusters for {report['true_classes']} true classes, "
                     f"clustering accuracy {report['accuracy']:.3f}, NMI {report['nmi']:.3f}, "
                     f"{report['rejected_tasks']:.1%} of tasks rejected")


def inferred_dataset(cfg, session, subsets, offsets: np.ndarray, images: torch.Tensor,
                     labels: torch.Tensor) -> FlatDataset:
    """The training set of the inferred labels: item j is stacked image `images[j]` with label `labels[j]`,
    grouped by sub-dataset (in their order), with the supervised step's transform."""
    images, labels = images.numpy(), labels.numpy()
    domain = np.searchsorted(offsets[1:], images, side="right")
    pixels = np.concatenate([sub.flat.images[images[domain == d] - offsets[d]] for d, sub in enumerate(subsets)])
    labels = np.concatenate([labels[domain == d] for d in range(len(subsets))])
    dataset = FlatDataset(pixels, labels, transform_from_config(cfg.dataset, cfg.sup_data_aug),
                          rotate=cfg.sup_rotate_aug, name=f"{cfg.dataset.name}/inferred")
    session.log.info(f"labeler: {len(np.unique(images)):,} of the {int(offsets[-1]):,} train images labelled (the "
                     f"rest are in rejected tasks or in no task), {len(labels):,} training items (an image drawn by "
                     f"several random tasks counts once per task)")
    return dataset


def write_labeler_files(cfg, session, centroids: torch.Tensor, report: dict, origin: str, n_items: int,
                        n_cls: int) -> None:
    """centroids.pt and labeler.json to the run's checkpoint folder, labeler.json and cluster_sizes.png to the run
    directory (by the main process)."""
    if not session.is_main:
        return
    labeler.save_centroids(session.checkpoint_dir / CENTROIDS_FILE, centroids, n_ways=cfg.n_ways,
                           std_factor=cfg.std_factor, K=cfg.K, backbone=origin, n_cls=n_cls)
    summary = {**report, "backbone": origin, "labelled_images": n_items, "n_cls": n_cls}
    for directory in (session.checkpoint_dir, session.run_dir):
        (directory / REPORT_FILE).write_text(json.dumps(summary, indent=2))
    labeler.plot_cluster_sizes(report, session.run_dir / SIZES_PLOT)


def infer_global_labels(cfg, session, backbone: torch.nn.Module, origin: str) -> FlatDataset:
    """The labeler on flat tasks of the train split, seen through the frozen backbone (`origin`: where it was
    loaded from, recorded in the files); the pseudo-labelled training set of the accepted tasks."""
    subsets = load_split(cfg.dataset, "train")
    tasks = draw_tasks(cfg, subsets)
    encoded = encode_tasks(session, session.prepare(backbone), subsets, tasks)
    keys = labeler.class_means(encoded.features, encoded.tasks)
    centroids = labeler_centroids(cfg, session, keys, encoded.features.shape[1])
    assignment, accepted = labeler.assign_tasks(keys, centroids)
    images, labels, n_cls = labeler.pseudo_labels(encoded.tasks, assignment, accepted)
    report = labeler.labeler_report(assignment, accepted, encoded.true_classes, encoded.task_domain,
                                    [sub.name for sub in subsets], len(centroids), cfg.n_shots + cfg.n_queries)
    log_report(session, report)
    dataset = inferred_dataset(cfg, session, subsets, encoded.offsets, images, labels)
    write_labeler_files(cfg, session, centroids, report, origin, len(labels), n_cls)
    return dataset
