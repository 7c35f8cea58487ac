"""MAXL (Liu, Davison, Johns 2019) and its baselines, trained by the shared engine.

Each epoch: (1) a full pass updating the multi-task net on the primary and auxiliary losses; for the label
learning methods (2) a full pass of meta-updates of the label generator on a new shuffle of the same training
data; then (3) a test pass. Methods:
  single           primary head only;
  human            auxiliary targets = the true finer-level labels, placed in the psi blocks MAXL uses;
  random           auxiliary targets = a fixed random class inside each image's psi block (seeded);
  maxl             auxiliary targets from the label generator, meta-learned with the exact second-order gradient;
  maxl_first_order the same with the finite-difference (DARTS-style) approximation of that gradient.
"""
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call, jvp

from dataset.catalog import AUXILIARY_LEVEL, PRIMARY_LEVEL
from dataset.hierarchical import HierarchicalData, ImageDataset, image_dataset
from engine.distributed import all_reduce_mean_, all_reduce_sum_, gather_shards, is_distributed
from engine.errors import UserError
from engine.metrics import MeanTracker
from engine.settings import (NON_NEGATIVE, POSITIVE, POSITIVE_INT, AnyOf, BatchSettings, EpochSettings, IntegerList,
                             Null, OneOf, setting)
from engine.trainer import Phase, TrainingJob
from methods.losses import (at_least_float32, focal_loss, gradient_cosine, negative_entropy, sample_entropy,
                            soft_target_gradient)
from models import create_model
from models.resnet import DropBlock, dropblock_schedules_paused

# torch's forward-mode AD loads its decompositions through the deprecated torch.jit.script, once, and says so.
warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)

METHODS = ("single", "human", "random", "maxl", "maxl_first_order")
LABEL_LEARNING = ("maxl", "maxl_first_order")


@dataclass
class MaxlSettings(EpochSettings, BatchSettings):
    """MAXL and its baselines (defaults: the original code's)."""

    method: str = setting("maxl", OneOf(METHODS), "the auxiliary labels: none, the true finer ones, random "
                         "ones, or learnt (exact or first-order meta-gradient)")
    primary_level: object = setting("${dataset.primary_level}", PRIMARY_LEVEL,
                                    "the primary task's label level, named by its number of classes (CIFAR-100: "
                                    "3, 10, 20, 100); default: the dataset's")
    auxiliary_level: object = setting("${dataset.auxiliary_level}", AUXILIARY_LEVEL,
                                      "the finer level that human uses and psi is derived from")
    psi: object = setting(None, AnyOf((Null("derived from the hierarchy"), POSITIVE_INT,
                                       IntegerList(1, "[5,5,...] (one count per primary class)", comma_text=False))),
                          "auxiliary classes per primary class: null (from the hierarchy), K, or [k1, k2, ...]")
    lr: float = setting(0.01, POSITIVE, "multi-task SGD (no momentum, no weight decay); also the virtual step's "
                        "size")
    lr_step: int = setting(50, POSITIVE_INT, "both learning rates are multiplied by lr_gamma every lr_step epochs")
    lr_gamma: float = setting(0.5, POSITIVE, "the learning rates' decay factor")
    gen_lr: float = setting(0.001, POSITIVE, "label generator SGD")
    gen_weight_decay: float = setting(5e-4, NON_NEGATIVE, "label generator L2 weight decay")
    entropy_weight: float = setting(0.2, NON_NEGATIVE, "weight of the batch-entropy regulariser on the generated "
                                    "labels")
    focal_gamma: float = setting(2.0, NON_NEGATIVE, "focal loss exponent (primary, auxiliary and meta losses)")
    cossim_every: int = setting(50, POSITIVE_INT, "iterations between two gradient cosine-similarity (COSSIM) "
                                "diagnostics")
    fd_epsilon: float = setting(0.01, POSITIVE, "maxl_first_order: finite-difference step, divided by the "
                                "gradient norm")


# ---- the auxiliary task: psi and auxiliary targets ---------------------------------------------------------

@dataclass
class AuxiliaryTask:
    """Primary labels and the auxiliary label space: primary class i owns aux classes [offset[i], offset[i]+psi[i])."""

    psi: list[int]
    primary_column: int
    auxiliary_column: int | None  # None for a dataset with a single label level
    # Rank of each auxiliary-level class among the classes under its primary class (by id), over the whole
    # hierarchy (train and test); None unless the auxiliary level nests under the primary one.
    child_positions: np.ndarray | None = None

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.psi)[:-1]]).astype(np.int64)

    def human_targets(self, labels: np.ndarray) -> np.ndarray:
        """The true auxiliary-level class of each image, as its position inside its primary class's block (the
        same for every split, also one that lacks some classes)."""
        primary, auxiliary = labels[:, self.primary_column], labels[:, self.auxiliary_column]
        return self.offsets[primary] + self.child_positions[auxiliary]

    def random_targets(self, labels: np.ndarray, seed: int) -> np.ndarray:
        """One fixed random auxiliary class per image, uniform inside its primary class's block."""
        primary = labels[:, self.primary_column]
        draws = np.random.default_rng(seed).random(len(primary))
        return self.offsets[primary] + (draws * np.asarray(self.psi)[primary]).astype(np.int64)


def _children_per_parent(data: HierarchicalData, primary_column: int, auxiliary_column: int, levels: str):
    """psi (auxiliary-level classes per primary class) and each auxiliary class's rank under its primary class,
    from train and test together."""
    labels = np.concatenate([data.train_labels, data.test_labels])
    pairs = np.unique(labels[:, [primary_column, auxiliary_column]], axis=0)  # sorted by parent, then child
    parents_of_child = np.bincount(pairs[:, 1])
    if (parents_of_child > 1).any():
        child = int(np.argmax(parents_of_child > 1))
        raise UserError(f"{levels}: auxiliary class {child} falls under several primary classes, so psi cannot "
                        f"be derived from the hierarchy; give psi=[...] explicitly (method=human needs nesting)")
    psi = np.bincount(pairs[:, 0], minlength=data.level_sizes[primary_column])
    first_of_parent = np.concatenate([[0], np.cumsum(psi)[:-1]])
    positions = np.full(data.level_sizes[auxiliary_column], -1, dtype=np.int64)
    positions[pairs[:, 1]] = np.arange(len(pairs)) - first_of_parent[pairs[:, 0]]
    return psi.tolist(), positions


def auxiliary_task(data: HierarchicalData, cfg) -> AuxiliaryTask:
    """Resolve primary/auxiliary levels and psi (derived from the hierarchy, or given and validated)."""
    primary_column = data.level_column(cfg.primary_level, "primary_level")
    n_primary = data.level_sizes[primary_column]
    auxiliary_column = (None if cfg.auxiliary_level is None
                        else data.level_column(cfg.auxiliary_level, "auxiliary_level"))
    levels = f"dataset {data.name}, primary_level={cfg.primary_level}, auxiliary_level={cfg.auxiliary_level}"
    derived = positions = None
    if auxiliary_column is not None and cfg.auxiliary_level > cfg.primary_level:
        derived, positions = _children_per_parent(data, primary_column, auxiliary_column, levels)
    if cfg.method == "human" and derived is None:
        raise UserError(f"method=human needs an auxiliary level finer than the primary one ({levels}); "
                        f"levels of {data.name}: {data.level_sizes}")
    if cfg.psi is None:
        if derived is None and cfg.method != "single":
            raise UserError(f"{levels}: psi cannot be derived (no finer auxiliary level); give psi=K "
                            f"(K auxiliary classes per primary class) or psi=[k1,...,k{n_primary}]")
        psi = derived or [1] * n_primary
    elif isinstance(cfg.psi, int):
        psi = [cfg.psi] * n_primary
    else:
        psi = [int(k) for k in cfg.psi]
    if len(psi) != n_primary:
        raise UserError(f"psi has {len(psi)} entries but the primary level has {n_primary} classes: give one "
                        f"count per primary class")
    if min(psi) < 1:
        raise UserError(f"psi[{psi.index(min(psi))}]={min(psi)}: every primary class needs at least one "
                        f"auxiliary class")
    if cfg.method == "human" and psi != derived:
        raise UserError(f"method=human takes psi from the hierarchy ({derived}); drop the explicit psi")
    return AuxiliaryTask(psi, primary_column, auxiliary_column, positions)


# ---- the meta-gradient -------------------------------------------------------------------------------------

@contextmanager
def batch_statistics(model: nn.Module):
    """Batch norm normalises with batch statistics and leaves the running statistics untouched (virtual steps)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def _random_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def draws_masks(model: nn.Module) -> bool:
    """Whether a training forward of `model` draws random masks (dropout or DropBlock at a non-zero rate)."""
    return model.training and any((isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
                                  or (isinstance(m, DropBlock) and m.drop_rate > 0) for m in model.modules())


@contextmanager
def replayed_randomness(state, device: torch.device):
    """Run the block from the random state `state` (of `_random_state`), then continue from the current one: a
    forward inside draws the same dropout and DropBlock masks as the forward that started from `state`."""
    with torch.random.fork_rng([device] if state[1] is not None else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def meta_gradient(model, generator, x, y, alpha: float, entropy_weight: float, gamma: float,
                  first_order: bool = False, fd_epsilon: float = 0.01):
    """MAXL's generator gradient on one batch, and the primary loss/accuracy before and after the virtual step.

    Objective: L_pri(theta1+) + entropy_weight * sum(m log m), with theta1+ = theta1 - alpha * grad L(theta1),
    L = L_pri + L_aux(generated labels), m the batch-mean generated label. The generator (theta2) reaches
    theta1+ only through the soft targets t of L_aux, so by the chain rule

        d L_pri(theta1+) / d t = -alpha * d/d eps [d L_aux(theta1 + eps v, t) / d t]_{eps=0},  v = grad L_pri(theta1+),

    a mixed second derivative that forward-mode AD (`jvp`) gives exactly, at the cost of one forward pass with
    tangents, instead of a double backward through a `create_graph=True` gradient. `first_order` replaces the
    jvp by the reference's central finite difference with eps = fd_epsilon / ||v|| (a zero v gives a zero
    curvature). The entropy term's gradient is applied in both variants (the reference's first-order code
    dropped it).

    The forward at theta1 runs on the real modules in train mode (its running statistics move, as in the
    reference; DropBlock's schedule advances once); the virtual forwards use batch statistics, leave every
    buffer untouched, and the ones that differentiate L_aux (jvp or finite difference) replay the random masks
    of the forward at theta1, so that with dropout or DropBlock in the backbone the gradient is still exact for
    the masks drawn (the forward at theta1+ draws its own). A model without such layers (VGG-16) skips the replay
    and its random-state copies.

    In a distributed run each rank holds a shard of the batch: the inner gradient, v and the batch-mean label are
    averaged across ranks and the generator gradients summed, which gives the single-process gradient on the
    whole batch exactly (for a model without batch statistics; batch norm normalises per rank).
    """
    world = torch.distributed.get_world_size() if is_distributed() else 1
    names, params = zip(*model.named_parameters())
    soft = generator(x, y)
    targets = soft.detach()
    masks_at_theta1 = _random_state(x.device) if draws_masks(model) else None
    pri_logits, aux_logits = model(x)
    pre_loss = focal_loss(pri_logits.log_softmax(1), y, gamma)
    inner_grads = torch.autograd.grad(pre_loss + focal_loss(aux_logits.log_softmax(1), targets, gamma), params)
    all_reduce_mean_(inner_grads)
    fast = {n: (p - alpha * g).detach().requires_grad_() for n, p, g in zip(names, params, inner_grads)}
    with batch_statistics(model), dropblock_schedules_paused(model):
        after_logits = functional_call(model, fast, (x,))[0]
        after_loss = focal_loss(after_logits.log_softmax(1), y, gamma)
        direction = torch.autograd.grad(after_loss, list(fast.values()), materialize_grads=True)
        all_reduce_mean_(direction)
        base = {n: p.detach() for n, p in zip(names, params)}

        replay = nullcontext if masks_at_theta1 is None else lambda: replayed_randomness(masks_at_theta1, x.device)

        def aux_target_gradient(weights):
            with replay():
                return soft_target_gradient(functional_call(model, weights, (x,))[1], gamma)

        if first_order:
            # theta1 +- eps v with eps = fd_epsilon / ||v||, written with the unit direction so that v = 0 gives
            # a zero curvature (not 0 / 0)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in direction]))
            unit = [d / norm.clamp_min(torch.finfo(norm.dtype).tiny) for d in direction]
            with torch.no_grad():
                plus = aux_target_gradient({n: b + fd_epsilon * u for (n, b), u in zip(base.items(), unit)})
                minus = aux_target_gradient({n: b - fd_epsilon * u for (n, b), u in zip(base.items(), unit)})
            curvature = (plus - minus) * (norm / (2 * fd_epsilon))
        else:
            _, curvature = jvp(aux_target_gradient, (base,), (dict(zip(names, direction)),))
    batch_mean = soft.mean(0)
    global_mean = batch_mean.detach().clone()
    all_reduce_mean_([global_mean])
    global_mean.requires_grad_()
    entropy_grad, = torch.autograd.grad(negative_entropy(global_mean), global_mean)
    gen_grads = torch.autograd.grad((soft, batch_mean), list(generator.parameters()),
                                    grad_outputs=(-alpha / world * curvature, entropy_weight / world * entropy_grad))
    all_reduce_sum_(gen_grads)
    stats = {"pre_loss": pre_loss.detach(), "pre_acc": (pri_logits.argmax(1) == y).float().mean(),
             "after_loss": after_loss.detach(), "after_acc": (after_logits.argmax(1) == y).float().mean()}
    return gen_grads, stats


# ---- the training job --------------------------------------------------------------------------------------

def purity(true: np.ndarray, predicted: np.ndarray) -> float:
    """Share of samples whose predicted cluster's majority true class is their own."""
    from sklearn.metrics.cluster import contingency_matrix  # imported when first needed: scripts start faster

    return float(contingency_matrix(true, predicted).max(axis=0).sum() / len(true))


def generator_agreement(true: np.ndarray, generated: np.ndarray, primary: np.ndarray) -> dict:
    """How well the generator's arg-max labels recover the true finer-level labels, next to what the trivial
    labelling (one label per psi block) and chance score.

    gen/nmi, gen/purity: over all images; the block structure alone earns these a lot (gen/nmi_trivial,
    gen/purity_trivial). gen/*_within: inside each primary class with at least two finer classes among its images,
    averaged with equal weight; there the trivial labelling scores NMI 0 and gen/purity_within_trivial, and
    *_within_chance is what the generated labels shuffled inside each class score (what finding nothing scores).
    """
    from sklearn.metrics import normalized_mutual_info_score

    metrics = {"gen/nmi": float(normalized_mutual_info_score(true, generated)),
               "gen/nmi_trivial": float(normalized_mutual_info_score(true, primary)),
               "gen/purity": purity(true, generated), "gen/purity_trivial": purity(true, primary)}
    inside = [primary == c for c in np.unique(primary) if len(np.unique(true[primary == c])) > 1]
    if inside:
        shuffle = np.random.default_rng(0)  # fixed: the same chance level for the same labels, every epoch
        shuffled = [shuffle.permutation(generated[m]) for m in inside]
        within = {"nmi_within": [normalized_mutual_info_score(true[m], generated[m]) for m in inside],
                  "nmi_within_chance": [normalized_mutual_info_score(true[m], s) for m, s in zip(inside, shuffled)],
                  "purity_within": [purity(true[m], generated[m]) for m in inside],
                  "purity_within_trivial": [purity(true[m], primary[m]) for m in inside],
                  "purity_within_chance": [purity(true[m], s) for m, s in zip(inside, shuffled)]}
        metrics |= {f"gen/{key}": float(np.mean(values)) for key, values in within.items()}
    return metrics


class MaxlJob(TrainingJob):
    monitors = {"best": "test/acc"}
    headline = ["test/acc_last5_mean"]  # a key of `summarize`

    def __init__(self, cfg, data: HierarchicalData, session):
        self.cfg, self.session, self.method = cfg, session, cfg.method
        self.task = auxiliary_task(data, cfg)
        self.has_auxiliary = self.method != "single"
        self.learns_labels = self.method in LABEL_LEARNING
        n_primary = len(self.task.psi)
        classes = [n_primary, sum(self.task.psi)] if self.has_auxiliary else [n_primary]
        model_args = {"backbone": cfg.model.name, **{k: v for k, v in cfg.model.items() if k != "name"}}
        self.model = session.prepare(create_model("multitask", classes=classes, **model_args))
        self.train_model = session.distribute(self.model)  # phase 1; the meta step runs on the module itself
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.lr_step, cfg.lr_gamma)
        if self.learns_labels:
            self.generator = session.prepare(create_model("label_generator", psi=self.task.psi, **model_args))
            self.gen_optimizer = torch.optim.SGD(self.generator.parameters(), lr=cfg.gen_lr,
                                                 weight_decay=cfg.gen_weight_decay)
            self.gen_scheduler = torch.optim.lr_scheduler.StepLR(self.gen_optimizer, cfg.lr_step, cfg.lr_gamma)
        self.train_loader = session.loader(self._dataset(data, train=True), cfg.batch_size, shuffle=True)
        self.test_loader = session.loader(self._dataset(data, train=False), cfg.batch_size, shuffle=False)

    def _dataset(self, data: HierarchicalData, train: bool) -> ImageDataset:
        """Targets per image: [primary, auxiliary target (-1 if none), true auxiliary-level class (-1 if none)]."""
        images, labels = (data.train_images, data.train_labels) if train else (data.test_images, data.test_labels)
        none = np.full(len(labels), -1)
        auxiliary = {"human": lambda: self.task.human_targets(labels),
                     "random": lambda: self.task.random_targets(labels, self.cfg.seed) if train else none}
        aux_target = auxiliary.get(self.method, lambda: none)()
        true_aux = labels[:, self.task.auxiliary_column] if self.task.auxiliary_column is not None else none
        targets = np.stack([labels[:, self.task.primary_column], aux_target, true_aux], axis=1)
        return image_dataset(images, targets, self.cfg.dataset, train)

    def state_objects(self) -> dict:
        objects = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}
        if self.learns_labels:
            objects |= {"generator": self.generator, "gen_optimizer": self.gen_optimizer,
                        "gen_scheduler": self.gen_scheduler}
        return objects

    def _on_device(self, batch):
        x, targets, _ = batch
        return self.session.to_device(x), targets.to(self.session.device, non_blocking=True)

    def phases(self, epoch: int) -> list[Phase]:
        """(1) the multi-task pass; for the label-learning methods (2) the meta pass over a new shuffle."""
        meta = [Phase("meta", self.train_loader, self._generator_phase_step)] if self.learns_labels else []
        return [Phase("multi-task", self.train_loader, self._multitask_phase_step)] + meta

    def end_epoch(self, epoch: int) -> None:
        if self.learns_labels:
            self.gen_scheduler.step()
        self.scheduler.step()

    def _multitask_phase_step(self, batch, tracker) -> None:
        self.model.train()
        x, targets = self._on_device(batch)
        metrics = self.multitask_step(x, targets, with_cossim=tracker.step % self.cfg.cossim_every == 0)
        for key, value in metrics.items():
            tracker.add(key, value, 1 if key == "train/cossim" else len(x))

    def multitask_step(self, x, targets, with_cossim: bool) -> dict:
        """One SGD step of the multi-task (or single-task) net; returns the batch's metrics as tensors."""
        gamma, y = self.cfg.focal_gamma, targets[:, 0]
        cossim = with_cossim and self.has_auxiliary
        with self.session.autocast():
            # COSSIM takes two separate gradients, which DistributedDataParallel's backward hooks do not allow.
            outputs = (self.model if cossim else self.train_model)(x)
            pri_loss = focal_loss(at_least_float32(outputs[0]).log_softmax(1), y, gamma)
            metrics = {"train/loss": pri_loss.detach(), "train/acc": (outputs[0].argmax(1) == y).float().mean()}
            if self.has_auxiliary:
                if self.learns_labels:
                    with torch.no_grad():  # generated labels are targets here; the generator is not stepped
                        aux_target = at_least_float32(self.generator(x, y))
                else:
                    aux_target = targets[:, 1]
                    metrics["train/aux_acc"] = (outputs[1].argmax(1) == aux_target).float().mean()
                aux_loss = focal_loss(at_least_float32(outputs[1]).log_softmax(1), aux_target, gamma)
                metrics["train/aux_loss"] = aux_loss.detach()
        self.optimizer.zero_grad(set_to_none=True)
        if cossim:
            metrics["train/cossim"] = self._backward_with_cossim(pri_loss, aux_loss)
        else:
            (pri_loss + aux_loss if self.has_auxiliary else pri_loss).backward()
        self.optimizer.step()
        return metrics

    def _backward_with_cossim(self, pri_loss, aux_loss) -> torch.Tensor:
        """Set the gradient of pri_loss + aux_loss from the two separate gradients (averaged over ranks) and return
        their COSSIM over the shared (backbone) parameters. One extra backward, every `cossim_every` steps."""
        params = list(self.model.parameters())
        pri = torch.autograd.grad(pri_loss, params, retain_graph=True, materialize_grads=True)
        aux = torch.autograd.grad(aux_loss, params, materialize_grads=True)
        all_reduce_mean_(pri + aux)  # the whole batch's gradients, as one process would see them
        for p, a, b in zip(params, pri, aux):
            p.grad = a + b
        shared = {id(p) for p in self.model.shared_parameters()}
        pairs = [(a, b) for p, a, b in zip(params, pri, aux) if id(p) in shared]
        return gradient_cosine(*zip(*pairs)).detach()

    def _generator_phase_step(self, batch, tracker) -> None:
        self.model.train()
        self.generator.train()
        x, targets = self._on_device(batch)
        for key, value in self.generator_step(x, targets).items():
            tracker.add(f"meta/{key}", value, len(x))

    def generator_step(self, x, targets) -> dict:
        """One meta-update of the label generator; the multi-task net is not updated."""
        cfg = self.cfg
        alpha = self.optimizer.param_groups[0]["lr"]  # the virtual step follows the multi-task learning rate
        grads, stats = meta_gradient(self.model, self.generator, x, targets[:, 0], alpha, cfg.entropy_weight,
                                     cfg.focal_gamma, first_order=self.method == "maxl_first_order",
                                     fd_epsilon=cfg.fd_epsilon)
        for p, g in zip(self.generator.parameters(), grads):
            p.grad = g
        self.gen_optimizer.step()
        return stats

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        cfg, tracker = self.cfg, MeanTracker()
        self.model.eval()
        if self.learns_labels:
            # Without dropout / DropBlock (backbones that have them); its batch norm has no running statistics,
            # so for VGG-16 this is the training-mode generator the reference evaluates.
            self.generator.eval()
        labels = []  # per batch: primary, true auxiliary-level class, generated label
        for batch in self.session.progress(self.test_loader, f"epoch {epoch + 1}/{self.cfg.epochs} test"):
            x, targets = self._on_device(batch)
            y = targets[:, 0]
            with self.session.autocast():
                outputs = self.model(x)
                soft = at_least_float32(self.generator(x, y)) if self.learns_labels else None
            tracker.add("test/loss", focal_loss(at_least_float32(outputs[0]).log_softmax(1), y, cfg.focal_gamma),
                        len(y))
            tracker.add("test/acc", (outputs[0].argmax(1) == y).float().mean(), len(y))
            if self.method == "human":
                tracker.add("test/aux_acc", (outputs[1].argmax(1) == targets[:, 1]).float().mean(), len(y))
            if soft is not None:
                tracker.add("gen/entropy", sample_entropy(soft).mean(), len(y))
                labels.append(torch.stack([y, targets[:, 2], soft.argmax(1)], 1).cpu())
        if self.learns_labels:
            self.generator.train()
        metrics = tracker.result(self.session)
        if labels and self.task.auxiliary_column is not None:
            primary, true, generated = gather_shards(torch.cat(labels)).numpy().T  # in test-set order
            metrics |= generator_agreement(true, generated, primary)
        return metrics

    def summarize(self, history: list[dict]) -> dict:
        accuracies = [row["test/acc"] for row in history]
        return {"test/acc_best": max(accuracies), "test/acc_last5_mean": float(np.mean(accuracies[-5:])),
                "test/acc_last": accuracies[-1]}
