"""MeLa step 1, meta-representation learning: `python learn_meta_repr.py dataset=miniImageNet [key=value ...]`."""
from engine import hydra_main
from methods.mela_jobs import MetaLearningJob, val_evaluator
from methods.optimizers import int_list, optimizer
from methods.scripts import LEARN_META_REPR
from methods.step_checkpoints import build_backbone


@hydra_main(LEARN_META_REPR)
def main(cfg, session):
    backbone = session.prepare(build_backbone(cfg.model))
    evaluator = val_evaluator(cfg, session, cfg.val_n_ways, cfg.test_C)
    job = MetaLearningJob(cfg, session, backbone, optimizer(cfg, backbone.parameters()), evaluator,
                          validate_from=int_list(cfg.lr_decay_epochs)[0])
    return session.fit(job, cfg.epochs)


if __name__ == "__main__":
    main()
