"""The oracle, supervised pre-training on the true labels:
`python sup_baseline.py dataset=miniImageNet [key=value ...]`."""
from dataset.fewshot import load_supervised_set
from engine import hydra_main
from methods.mela_jobs import SupervisedJob, val_evaluator
from methods.optimizers import int_list
from methods.scripts import SUP_BASELINE


@hydra_main(SUP_BASELINE)
def main(cfg, session):
    train = load_supervised_set(cfg.dataset, "train", augment=cfg.data_aug, rotate=cfg.rotate_aug)
    evaluator = val_evaluator(cfg, session, cfg.n_ways, cfg.test_C)
    job = SupervisedJob(cfg, session, train, evaluator, validate_from=int_list(cfg.lr_decay_epochs)[0],
                        rotate=cfg.rotate_aug)
    return session.fit(job, cfg.epochs)


if __name__ == "__main__":
    main()
