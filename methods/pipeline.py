"""The whole MeLa chain with consistent arguments, then meta_eval of every stage and one table:

    python -m methods.pipeline --dataset miniImageNet [--name NAME] [--python PY] -- key=value ...

Steps: learn_meta_repr -> learn_labeler (pretrained_labeler = step 1) -> fine_tune (pretrained_model = step 2),
and sup_baseline (the oracle); each run is named `<NAME>_<step>`, so each step finds the previous one's
checkpoint by name. Every override goes to each script whose config has its key (e.g. `epochs=...` to the
training steps, `model.width_mult=...` to all of them); `SCRIPT:key=value` goes to that script alone (e.g.
`fine_tune:epochs=2`); an override no script knows is an error. meta_eval runs write to
logs/pipeline/<NAME>/<step>/. `make pipeline DATASET=... ARGS='...'` calls this.
"""
import argparse
import subprocess
import sys
from pathlib import Path

from engine.entry import compose
from methods.fewshot_eval import read_results, results_table

ROOT = Path(__file__).resolve().parent.parent
TRAINING = ("learn_meta_repr", "learn_labeler", "fine_tune", "sup_baseline")
LABELS = {"learn_meta_repr": "learn_meta_repr (MetaLS)", "learn_labeler": "labeler + supervised",
          "fine_tune": "fine_tune", "sup_baseline": "sup_baseline (oracle)"}


def root_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split(".", 1)[0].split("@", 1)[0]


def config_keys(script: str, dataset: str) -> set[str]:
    return set(compose(script, [f"dataset={dataset}"]).keys()) | {"hydra"}


def run(python: str, script: str, args: list[str]) -> None:
    print(f"\n==> {script}.py {' '.join(args)}", flush=True)
    done = subprocess.run([python, str(ROOT / f"{script}.py"), *args])
    if done.returncode:
        raise SystemExit(f"error: {script}.py failed (exit status {done.returncode}); the pipeline stops there")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="dataset= of every step")
    parser.add_argument("--name", help="prefix of the run names (default: pipeline_<dataset>)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs the scripts")
    parser.add_argument("overrides", nargs="*", help="key=value for every step that has the key")
    args = parser.parse_args(argv)
    name = args.name or f"pipeline_{args.dataset}"
    keys = {script: config_keys(script, args.dataset) for script in (*TRAINING, "meta_eval")}
    common = {script: [f"dataset={args.dataset}"] for script in keys}
    for override in args.overrides:
        script, _, scoped = override.partition(":") if override.split("=", 1)[0].count(":") else ("", "", override)
        targets = [script] if script else [s for s, k in keys.items() if root_key(scoped) in k]
        if not targets or any(t not in keys or root_key(scoped) not in keys[t] for t in targets):
            raise SystemExit(f"error: {override}: no such key in {script or 'any pipeline script'}; scripts: "
                             f"{', '.join(keys)}")
        for target in targets:
            common[target].append(scoped)
    inputs = {"learn_labeler": [f"pretrained_labeler={name}_learn_meta_repr"],
              "fine_tune": [f"pretrained_model={name}_learn_labeler"]}
    for script in TRAINING:
        run(args.python, script, [*common[script], *inputs.get(script, []), f"name={name}_{script}"])
    eval_dirs = {}
    for script in TRAINING:
        eval_dirs[script] = Path("logs") / "pipeline" / name / script
        run(args.python, "meta_eval", [*common["meta_eval"], f"pretrained_model={name}_{script}",
                                       f"name={name}_eval_{script}", f"hydra.run.dir={eval_dirs[script]}"])
    print(f"\n{args.dataset}: meta_eval accuracy (%) with 95% intervals\n"
          + results_table({LABELS[s]: read_results(d / "results.json") for s, d in eval_dirs.items()}))


if __name__ == "__main__":
    main()
