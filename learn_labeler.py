"""MeLa step 2, global label inference and pre-training on the inferred labels:
`python learn_labeler.py dataset=miniImageNet pretrained_labeler=<learn_meta_repr run or .pt> [key=value ...]`."""
from engine import hydra_main
from methods.label_inference import infer_global_labels
from methods.mela_jobs import SupervisedJob, val_evaluator
from methods.optimizers import int_list
from methods.scripts import LEARN_LABELER
from methods.step_checkpoints import META_STEPS, load_step, pretrained_backbone, saved_model_cfg


@hydra_main(LEARN_LABELER)
def main(cfg, session):
    payload, path = load_step(cfg.pretrained_labeler, "pretrained_labeler", META_STEPS, cfg.checkpoint_dir,
                              session)
    labeling_backbone = pretrained_backbone(payload, saved_model_cfg(payload))
    train = infer_global_labels(cfg, session, labeling_backbone, origin=str(path))
    evaluator = val_evaluator(cfg, session, cfg.val_n_ways, C=1 / cfg.lam)
    job = SupervisedJob(cfg, session, train, evaluator, validate_from=int_list(cfg.lr_decay_epochs)[0],
                        rotate=cfg.sup_rotate_aug)
    return session.fit(job, cfg.epochs)


if __name__ == "__main__":
    main()
