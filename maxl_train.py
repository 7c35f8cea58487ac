"""MAXL and its baselines: `python maxl_train.py method=single|human|random|maxl|maxl_first_order [key=value ...]`."""
from dataset.hierarchical import load_hierarchical
from engine import hydra_main
from methods.maxl import MaxlJob
from methods.scripts import MAXL_TRAIN


@hydra_main(MAXL_TRAIN)
def main(cfg, session):
    data = load_hierarchical(cfg.dataset)
    job = MaxlJob(cfg, data, session)
    psi = f", psi={job.task.psi}" if job.has_auxiliary else ""
    session.log.info(f"{cfg.method}{psi}: {len(data.train_images)} training and {len(data.test_images)} test images")
    return session.fit(job, cfg.epochs)


if __name__ == "__main__":
    main()
