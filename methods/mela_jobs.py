"""MeLa's training steps as engine jobs, each validated few-shot on the val split.

    learn_meta_repr.py  MetaLearningJob: a backbone meta-learned with MetaLS on tasks with local labels only
    learn_labeler.py    SupervisedJob on the labels methods.label_inference inferred: a fresh backbone
    fine_tune.py        MetaLearningJob: a ResFC head meta-learned on a frozen pre-trained backbone
    sup_baseline.py     SupervisedJob on the true labels (the oracle)

Every job's checkpoint holds state["model"] and, next to it, where the backbone is in it
(methods.step_checkpoints.model_layout), which the later steps and meta_eval read.
"""
import torch

from dataset.fewshot import FlatDataset, load_split, make_tasks
from engine.trainer import Phase, TrainingJob
from methods.fewshot_eval import FewShotEvaluator, accuracy_metrics, best_monitors
from methods.meta_ls import MetaLS, meta_train_step
from methods.optimizers import int_list, optimizer, scheduler
from methods.step_checkpoints import build_backbone, model_layout
from methods.supervised import build_classifier, supervised_train_step
from methods.training import SKIPPED_STEPS
from models.resfc import FrozenBackboneHead


def val_evaluator(cfg, session, n_ways: int, C: float) -> FewShotEvaluator:
    """Few-shot validation on the val split with the logistic regression's C: test_C, except learn_labeler's
    C = 1 / lam (1000 by default), as the original (which overrides test_C there); so learn_labeler's val
    accuracies are not comparable with meta_eval's (C = test_C = 1)."""
    return FewShotEvaluator(cfg, session, "val", n_ways, int_list(cfg.val_n_shots), C)


class ValidatedJob(TrainingJob):
    """Few-shot validation on the val split from epoch `validate_from` on, and always after the last epoch (so
    that every run leaves a `best.pt`), of `evaluated` (the model, or the backbone of a classifier). `layout` (a
    `model_layout`) goes into every checkpoint."""

    layout: dict  # set by each job: where the backbone is in state["model"]
    skipped_steps_metric = SKIPPED_STEPS

    def __init__(self, cfg, session, model: torch.nn.Module, evaluator: FewShotEvaluator, validate_from: int):
        self.cfg, self.session, self.model, self.evaluated = cfg, session, model, model
        self.evaluator, self.validate_from = evaluator, validate_from
        self.monitors = best_monitors(evaluator.shots)
        self.headline = [f"val/{k}shot" for k in evaluator.shots]

    def evaluate(self, epoch: int) -> dict:
        if epoch < self.validate_from and epoch != self.cfg.epochs - 1:
            return {}
        return accuracy_metrics(self.evaluator(self.evaluated), "val")

    def state_objects(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def checkpoint_extras(self) -> dict:
        return dict(self.layout)

    def end_epoch(self, epoch: int) -> None:
        self.scheduler.step()

    def summarize(self, history: list[dict]) -> dict:
        validated = [row for row in history if any(key.startswith("val/") for key in row)]
        return {key: validated[-1][key] for key in validated[-1] if key.startswith("val/")} if validated else {}


class MetaLearningJob(ValidatedJob):
    """Meta-training with MetaLS on few-shot tasks of the train split. `opt` holds what is trained: the whole
    backbone (learn_meta_repr) or fine_tune's head (`model` is then a FrozenBackboneHead)."""

    def __init__(self, cfg, session, model, opt, evaluator, validate_from: int):
        super().__init__(cfg, session, model, evaluator, validate_from)
        head = isinstance(model, FrozenBackboneHead)
        self.layout = model_layout("backbone." if head else "", resfc_head=head)
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

    layout = model_layout("backbone.")

    def __init__(self, cfg, session, train: FlatDataset, evaluator, validate_from: int, rotate: bool):
        backbone = build_backbone(cfg.model)
        model = session.prepare(build_classifier(backbone, train.n_cls, rotate))
        super().__init__(cfg, session, model, evaluator, validate_from)
        self.evaluated = model.backbone
        self.train_model = session.distribute(model)
        self.loader = session.loader(train, cfg.batch_size, shuffle=True)
        self.optimizer = optimizer(cfg, model.parameters())
        self.scheduler = scheduler(cfg, self.optimizer)
        session.log.info(f"supervised training on {len(train)} images, {train.n_cls} classes"
                         + (" (x4 rotations)" if rotate else ""))

    def phases(self, epoch: int) -> list[Phase]:
        return [Phase("train", self.loader,
                      lambda batch, tracker: supervised_train_step(self.train_model, batch, self.optimizer,
                                                                   self.session, tracker))]
