"""Few-shot evaluation of any MeLa step's checkpoint:
`python meta_eval.py dataset=miniImageNet pretrained_model=<run name or .pt> [key=value ...]`."""
import csv
import json

from engine import hydra_main
from engine.checkpoint import file_identity
from methods.fewshot_eval import FewShotEvaluator, results_table
from methods.optimizers import int_list
from methods.scripts import META_EVAL
from methods.step_checkpoints import EVALUATED_STEPS, check_architecture, feature_model, load_step


@hydra_main(META_EVAL)
def main(cfg, session):
    payload, path = load_step(cfg.pretrained_model, "pretrained_model", EVALUATED_STEPS, cfg.checkpoint_dir)
    check_architecture(payload, cfg.model, "pretrained_model", path)
    model = session.prepare(feature_model(payload, cfg.model))
    evaluator = FewShotEvaluator(cfg, session, cfg.split, cfg.n_ways, int_list(cfg.val_n_shots), cfg.test_C)
    results = evaluator(model)
    if session.is_main:
        about = {"checkpoint": str(path), "checkpoint_sha256": file_identity(path), "script": payload["script"],
                 "epoch": payload["epoch"], "split": cfg.split, "n_ways": cfg.n_ways, "n_queries": cfg.n_queries,
                 "tasks_per_sub_dataset": cfg.test_db_size}
        saved = {k: {name: {"mean": m, "ci95": h} for name, (m, h) in per.items()} for k, per in results.items()}
        headline = [f"{cfg.split}/{k}shot" for k in results]  # the report's default metrics
        (session.run_dir / "results.json").write_text(json.dumps({**about, "headline": headline, "results": saved},
                                                                 indent=2))
        with open(session.run_dir / "results.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["shots", "sub_dataset", "mean", "ci95"])
            writer.writerows([k, name, m, h] for k, per in results.items() for name, (m, h) in per.items())
        session.log.info(f"{payload['script']} checkpoint {path}, {cfg.split} split, {cfg.n_ways}-way, "
                         f"{cfg.test_db_size} tasks per sub-dataset (accuracy %, 95% interval):\n"
                         + results_table({payload["script"]: results}))
        session.log.info(f"results: {session.run_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
