"""MeLa's pipeline steps as engine jobs, and what they share: checkpoints of earlier steps, few-shot validation.

    learn_meta_repr.py  MetaLearningJob: a backbone meta-learned with MetaLS on tasks with local labels only
    learn_labeler.py    infer_global_labels (the labeler on the frozen meta-learned backbone), then a
                        SupervisedJob: a fresh backbone trained on the inferred labels
    fine_tune.py        MetaLearningJob: a ResFC head meta-learned on a frozen pre-trained backbone
    sup_baseline.py     SupervisedJob on the true labels (the oracle)
    meta_eval.py        FewShotEvaluator on a checkpoint of any of the above

Every step's checkpoint holds state["model"]: the backbone itself (learn_meta_repr), a classifier with
`backbone.*` (learn_labeler, sup_baseline), or the frozen backbone with its ResFC head (fine_tune); and the
resolved config, from which the next step rebuilds the architecture.
"""
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from dataset.fewshot import FlatDataset, load_split, make_tasks, transform_from_config
from engine.checkpoint import load_checkpoint, resolve_checkpoint
from engine.distributed import gather_shards
from engine.errors import UserError
from engine.trainer import Phase, TrainingJob
from methods import labeler
from methods.fewshot_eval import evaluate_splits, extract_features
from methods.meta_ls import MetaLS, meta_train_step
from methods.supervised import build_classifier, supervised_train_step
from models import create_model
from models.resfc import FrozenBackboneHead

log = logging.getLogger("metalabel")

EVAL_BATCH = 256  # images per forward when extracting features (no autograd: large batches are cheap)
META_STEPS = ("learn_meta_repr",)
PRETRAINED_STEPS = ("learn_labeler", "sup_baseline", "learn_meta_repr")
EVALUATED_STEPS = ("learn_meta_repr", "learn_labeler", "fine_tune", "sup_baseline")


def int_list(value) -> list[int]:
    """The original's list keys came as strings ("17,22"); accept those, a number, or a list."""
    if isinstance(value, str):
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    if isinstance(value, (int, float)):
        return [int(value)]
    return [int(v) for v in value]


# ---- models and the checkpoints of earlier steps -----------------------------------------------------------

def build_backbone(model_cfg) -> torch.nn.Module:
    """The backbone a `model=` config describes (name plus its keyword arguments)."""
    return create_model(model_cfg.name, **{k: v for k, v in model_cfg.items() if k != "name"})


def load_step(value, key: str, steps: tuple[str, ...], checkpoint_dir) -> tuple[dict, Path]:
    """The checkpoint a `pretrained_*` key names (run name or .pt path), written by one of `steps`."""
    producers = " or ".join(f"{step}.py" for step in steps)
    path = resolve_checkpoint(value, Path(checkpoint_dir), key, producers)
    payload = load_checkpoint(path, fix=f"give {key} a checkpoint written by {producers}")
    if payload.get("script") not in steps:
        raise UserError(f"{key}={value} is a checkpoint of {payload.get('script')}.py; {key} takes one written by "
                        f"{producers}")
    return payload, path


def saved_model_cfg(payload: dict):
    return OmegaConf.create(payload["config"]).model


def check_architecture(payload: dict, model_cfg, key: str, path: Path) -> None:
    """The checkpoint's backbone must be the configured one (same name and size arguments). Keys the saved config
    does not have (added to the model configs later) are not compared."""
    saved = OmegaConf.to_container(saved_model_cfg(payload))
    current = OmegaConf.to_container(model_cfg, resolve=True)
    if saved != {k: v for k, v in current.items() if k in saved}:
        overrides = " ".join(f"model.{k}={v}" for k, v in saved.items() if k != "name")
        raise UserError(f"{key}: {path} holds a {saved['name']} backbone {saved} but this run builds {current}: "
                        f"run with model={saved['name']} {overrides}")


def backbone_state(payload: dict) -> dict:
    """The backbone's weights out of any step's checkpoint."""
    state = payload["state"]["model"]
    if payload["script"] in META_STEPS:
        return state
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


def pretrained_backbone(payload: dict, model_cfg) -> torch.nn.Module:
    backbone = build_backbone(model_cfg)
    backbone.load_state_dict(backbone_state(payload))
    return backbone


def fine_tune_network(backbone: torch.nn.Module) -> FrozenBackboneHead:
    """fine_tune's network: ResFC (residual, LayerNorm) on the L2-normalised features of a frozen backbone."""
    return FrozenBackboneHead(backbone, create_model("resfc", in_dim=backbone.feat_dim, out_dim=backbone.feat_dim))


def feature_model(payload: dict, model_cfg) -> torch.nn.Module:
    """What meta_eval evaluates: the backbone, with its ResFC head for a fine_tune checkpoint."""
    backbone = pretrained_backbone(payload, model_cfg)
    if payload["script"] != "fine_tune":
        return backbone
    network = fine_tune_network(backbone)
    network.load_state_dict(payload["state"]["model"])
    return network


def optimizer(cfg, params) -> torch.optim.Optimizer:
    """SGD(learning_rate, momentum, weight_decay), or with SGD=false Adam(learning_rate, weight_decay)."""
    if cfg.SGD:
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def scheduler(cfg, opt) -> torch.optim.lr_scheduler.MultiStepLR:
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=int_list(cfg.lr_decay_epochs),
                                                gamma=cfg.lr_decay_rate)


# ---- few-shot evaluation -----------------------------------------------------------------------------------

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
        from engine.validation import check_split_fits

        self.session, self.n_ways, self.shots, self.C = session, n_ways, shots, C
        self.n_queries, self.n_tasks = cfg.n_queries, cfg.test_db_size
        self.use_bias, self.is_norm = cfg.use_bias, cfg.is_norm
        self.subsets = load_split(cfg.dataset, split)
        # Checked now, not when validation first runs (epochs later); the training scripts validate with
        # val_n_ways, sup_baseline and meta_eval with n_ways.
        ways_key = "val_n_ways" if "val_n_ways" in cfg else "n_ways"
        check_split_fits(self.subsets, split, (ways_key, n_ways), ("val_n_shots", shots), self.n_queries)

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


# ---- training jobs -------------------------------------------------------------------------------------------

class ValidatedJob(TrainingJob):
    """Few-shot validation on the val split from epoch `validate_from` on, and always after the last epoch (so
    that every run leaves a `best.pt`)."""

    def __init__(self, cfg, session, model: torch.nn.Module, evaluator: FewShotEvaluator, validate_from: int):
        self.cfg, self.session, self.model = cfg, session, model
        self.evaluator, self.validate_from = evaluator, validate_from
        self.monitors = best_monitors(evaluator.shots)

    def evaluate(self, epoch: int) -> dict:
        if epoch < self.validate_from and epoch != self.cfg.epochs - 1:
            return {}
        return accuracy_metrics(self.evaluator(self.model), "val")

    def state_objects(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def end_epoch(self, epoch: int) -> None:
        self.scheduler.step()

    def summarize(self, history: list[dict]) -> dict:
        validated = [row for row in history if any(key.startswith("val/") for key in row)]
        return {key: validated[-1][key] for key in validated[-1] if key.startswith("val/")} if validated else {}


class MetaLearningJob(ValidatedJob):
    """Meta-training with MetaLS on few-shot tasks of the train split. `opt` holds what is trained: the whole
    backbone (learn_meta_repr) or fine_tune's head."""

    def __init__(self, cfg, session, model, opt, evaluator, validate_from: int):
        super().__init__(cfg, session, model, evaluator, validate_from)
        train = load_split(cfg.dataset, "train", augment=cfg.data_aug, rotate=cfg.rotate_aug)
        tasks = make_tasks(train, n_ways=cfg.n_ways, n_shots=cfg.n_shots, n_queries=cfg.n_queries,
                           shape="few_shot", no_replacement=cfg.no_replacement, fixed_db=cfg.fixed_db,
                           db_size=cfg.train_db_size, seed=cfg.seed)
        self.loader = session.loader(tasks, cfg.tasks_per_step, shuffle=True)
        self.learner = session.distribute(MetaLS(model, cfg.n_ways, cfg.lam, cfg.extra_reg, cfg.positive_pairs))
        self.optimizer, self.scheduler = opt, scheduler(cfg, opt)
        trained = sum(p.numel() for group in opt.param_groups for p in group["params"])
        session.log.info(f"meta-training on {len(tasks)} tasks per epoch ({', '.join(tasks.names)}), "
                         f"{trained:,} parameters trained")

    def phases(self, epoch: int) -> list[Phase]:
        return [Phase("meta-train", self.loader,
                      lambda batch, tracker: meta_train_step(self.learner, batch, self.optimizer, self.session,
                                                             tracker))]


class SupervisedJob(ValidatedJob):
    """Cross-entropy training of a backbone with a linear classifier (one head, or one per label level) on a flat
    dataset: the inferred labels (learn_labeler) or the true ones (sup_baseline)."""

    def __init__(self, cfg, session, train: FlatDataset, evaluator, validate_from: int, rotate: bool):
        backbone = build_backbone(cfg.model)
        model = session.prepare(build_classifier(backbone, train.n_cls, rotate))
        super().__init__(cfg, session, model, evaluator, validate_from)
        self.train_model = session.distribute(model)
        self.loader = session.loader(train, cfg.batch_size, shuffle=True)
        self.optimizer = optimizer(cfg, model.parameters())
        self.scheduler = scheduler(cfg, self.optimizer)
        session.log.info(f"supervised training on {len(train)} images, {train.n_cls} classes"
                         + (" (x4 rotations)" if rotate else ""))

    def evaluate(self, epoch: int) -> dict:
        if epoch < self.validate_from and epoch != self.cfg.epochs - 1:
            return {}
        return accuracy_metrics(self.evaluator(self.model.backbone), "val")

    def phases(self, epoch: int) -> list[Phase]:
        return [Phase("train", self.loader,
                      lambda batch, tracker: supervised_train_step(self.train_model, batch, self.optimizer,
                                                                   self.session, tracker))]


def validator(cfg, session, n_ways: int, C: float) -> FewShotEvaluator:
    """Few-shot validation on the val split with the logistic regression's C: test_C, except learn_labeler's
    C = 1 / lam (1000 by default), as the original (which overrides test_C there); so learn_labeler's val
    accuracies are not comparable with meta_eval's (C = test_C = 1)."""
    return FewShotEvaluator(cfg, session, "val", n_ways, int_list(cfg.val_n_shots), C)


# ---- the labeler ---------------------------------------------------------------------------------------------

@dataclass
class InferredLabels:
    dataset: FlatDataset  # the images of accepted tasks with their inferred labels
    centroids: torch.Tensor
    report: dict


def infer_global_labels(cfg, session, backbone: torch.nn.Module, origin: str) -> InferredLabels:
    """The labeler (methods.labeler) on flat tasks of the train split, seen through the frozen backbone: every
    image is encoded once; tasks are index sets into those features. Centroids come from clustering, or from
    `pretrained_centroids`, or (on resume) from this run's earlier `centroids.pt`. Writes centroids.pt and
    labeler.json to the run's checkpoint folder, labeler.json and cluster_sizes.png to the run directory."""
    subsets = load_split(cfg.dataset, "train")
    tasks = make_tasks(subsets, n_ways=cfg.n_ways, n_shots=cfg.n_shots, n_queries=cfg.n_queries, shape="flat",
                       no_replacement=cfg.no_replacement, fixed_db=cfg.fixed_db, db_size=cfg.train_db_size,
                       seed=cfg.seed)
    backbone = session.prepare(backbone)
    features, task_indices, true_classes = [], [], []
    for sub, part in zip(subsets, tasks.datasets):
        features.append(gathered_features(backbone, sub.flat, session, normalize=False)[0])  # raw, as the original
        drawn = [part.task_indices(i) for i in range(len(part))]
        true_classes.append(torch.as_tensor(np.stack([classes for classes, _ in drawn])))
        task_indices.append(torch.as_tensor(np.stack([indices for _, indices in drawn])))
    all_features, all_tasks, task_domain = labeler.stack_domains(features, task_indices)
    keys = labeler.class_means(all_features, all_tasks)
    saved = session.checkpoint_dir / "centroids.pt"
    if cfg.pretrained_centroids:
        centroids, _ = labeler.load_centroids(Path(str(cfg.pretrained_centroids)), all_features.shape[1])
        session.log.info(f"labeler: {len(centroids)} centroids from {cfg.pretrained_centroids}")
    elif session.resuming and saved.is_file():
        centroids, _ = labeler.load_centroids(saved, all_features.shape[1])
        session.log.info(f"labeler: {len(centroids)} centroids from this run's {saved}")
    else:
        centroids = labeler.cluster(keys, cfg.K, cfg.std_factor, cfg.seed).centroids
    assignment, accepted = labeler.assign_tasks(keys, centroids)
    images, labels, n_cls = labeler.pseudo_labels(all_tasks, assignment, accepted)
    report = labeler.labeler_report(assignment, accepted, torch.cat(true_classes), task_domain,
                                    [sub.name for sub in subsets], len(centroids), cfg.n_shots + cfg.n_queries)
    session.log.info(f"labeler: {report['clusters']} clusters for {report['true_classes']} true classes, "
                     f"clustering accuracy {report['accuracy']:.3f}, NMI {report['nmi']:.3f}, "
                     f"{report['rejected_tasks']:.1%} of tasks rejected")
    # Image i of the stacked features is image i - offset[d] of sub-dataset d.
    offsets = np.cumsum([0] + [len(f) for f in features])
    images, labels = images.numpy(), labels.numpy()
    domain = np.searchsorted(offsets[1:], images, side="right")
    pixels = np.concatenate([sub.flat.images[images[domain == d] - offsets[d]] for d, sub in enumerate(subsets)])
    labels = np.concatenate([labels[domain == d] for d in range(len(subsets))])
    dataset = FlatDataset(pixels, labels, transform_from_config(cfg.dataset, cfg.sup_data_aug),
                          rotate=cfg.sup_rotate_aug, name=f"{cfg.dataset.name}/inferred")
    session.log.info(f"labeler: {len(np.unique(images)):,} of the {int(offsets[-1]):,} train images labelled (the "
                     f"rest are in rejected tasks or in no task), {len(labels):,} training items (an image drawn by "
                     f"several random tasks counts once per task)")
    if session.is_main:
        labeler.save_centroids(saved, centroids, n_ways=cfg.n_ways, std_factor=cfg.std_factor, K=cfg.K,
                               backbone=origin, n_cls=n_cls)
        summary = {**report, "backbone": origin, "labelled_images": len(labels), "n_cls": n_cls}
        for directory in (session.checkpoint_dir, session.run_dir):
            (directory / "labeler.json").write_text(json.dumps(summary, indent=2))
        labeler.plot_cluster_sizes(report, session.run_dir / "cluster_sizes.png")
    return InferredLabels(dataset, centroids, report)
