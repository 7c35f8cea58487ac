"""MeLa step 3, meta fine-tuning of a ResFC head on a frozen pre-trained backbone:
`python fine_tune.py dataset=miniImageNet pretrained_model=<learn_labeler run or .pt> [key=value ...]`."""
import torch

from engine import hydra_main
from methods.mela_jobs import MetaLearningJob, val_evaluator
from methods.scripts import FINE_TUNE
from methods.step_checkpoints import (PRETRAINED_STEPS, check_architecture, fine_tune_network, load_step,
                                      pretrained_backbone)


@hydra_main(FINE_TUNE)
def main(cfg, session):
    payload, path = load_step(cfg.pretrained_model, "pretrained_model", PRETRAINED_STEPS, cfg.checkpoint_dir, session)
    check_architecture(payload, cfg.model, "pretrained_model", path)
    network = session.prepare(fine_tune_network(pretrained_backbone(payload, cfg.model)))
    opt = torch.optim.AdamW(network.head.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    evaluator = val_evaluator(cfg, session, cfg.val_n_ways, cfg.test_C)
    job = MetaLearningJob(cfg, session, network, opt, evaluator, validate_from=0)  # validated every epoch
    return session.fit(job, cfg.epochs)


if __name__ == "__main__":
    main()
