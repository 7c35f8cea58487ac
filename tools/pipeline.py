"""The whole MeLa chain with consistent arguments, then meta_eval of every stage, over datasets x models x seeds:

    python -m tools.pipeline --dataset miniImageNet [tieredImageNet ...] [--model resnet12 resnet18 ...]
                               [--seed 0 1 2] [--name NAME] [--out DIR] [--python PY] -- key=value ...

Per chain: learn_meta_repr -> learn_labeler -> fine_tune, and sup_baseline (the oracle), then meta_eval of each,
run `<NAME>_<dataset>_<model>_<step>_s<seed>` in `<DIR>/<dataset>_<model>_s<seed>/{train,eval}/<step>/`; without
--model or --seed, the scripts' model and seed (or the overrides'). The same command again continues the study.
An override goes to every script that has its key, `SCRIPT:key=value` to that script alone; one no script knows
is an error. Details: docs/experiments.md ("The MeLa study").
"""
import argparse
import itertools
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from engine.checkpoint import file_identity, load_checkpoint
from engine.config import changed_setting
from engine.entry import compose
from engine.errors import UserError
from engine.settings import declared
from methods.fewshot_eval import read_results, results_table
from methods.scripts import SCRIPTS

ROOT = Path(__file__).resolve().parent.parent
TRAINING = ("learn_meta_repr", "learn_labeler", "fine_tune", "sup_baseline")
EVALUATION = "meta_eval"
# step -> (its key that names the checkpoint it starts from, the step that writes that checkpoint)
INPUTS = {"learn_labeler": ("pretrained_labeler", "learn_meta_repr"),
          "fine_tune": ("pretrained_model", "learn_labeler")}
LABELS = {"learn_meta_repr": "learn_meta_repr (MetaLS)", "learn_labeler": "labeler + supervised",
          "fine_tune": "fine_tune", "sup_baseline": "sup_baseline (oracle)"}
# Overrides the pipeline sets itself: key -> how
SET_HERE = {"dataset": "give the datasets by --dataset", "name": "give its first part by --name",
            "pretrained_labeler": "to step 1's run", "pretrained_model": "to the previous step's run",
            "hydra.run.dir": "under --out"}


def root_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split(".", 1)[0].split("@", 1)[0]


def split_values(values: list[str] | None) -> list[str]:
    """`a b`, `a,b` or both: the listed values, in order."""
    return [v for value in values or [] for v in value.split(",") if v]


@dataclass
class Step:
    script: str
    name: str
    overrides: list[str]   # every override of its run except the run directory
    run_dir: Path
    cfg: DictConfig        # the config the run gets
    action: str = "run"    # run | skip | restart


@dataclass
class Chain:
    dataset: str
    model: str
    seed: int
    folder: Path
    training: list[Step] = field(default_factory=list)
    evaluations: list[Step] = field(default_factory=list)


def script_keys() -> dict[str, set[str]]:
    """script -> the top-level keys of its config: its declared settings and config groups (validation refuses any
    other key), and Hydra's node."""
    return {script: set(declared(SCRIPTS[script].settings)) | set(SCRIPTS[script].groups) | {"hydra"}
            for script in (*TRAINING, EVALUATION)}


def distribute(overrides: list[str], keys: dict[str, set[str]]) -> dict[str, list[str]]:
    """script -> the overrides it takes (see the module docstring)."""
    given = {script: [] for script in keys}
    for override in overrides:
        script, _, scoped = override.partition(":") if override.split("=", 1)[0].count(":") else ("", "", override)
        key = scoped.split("=", 1)[0].lstrip("+~")
        if key in SET_HERE:
            raise UserError(f"{override}: the pipeline sets {key} itself ({SET_HERE[key]})")
        targets = [script] if script else [s for s, k in keys.items() if root_key(scoped) in k]
        if not targets or any(t not in keys or root_key(scoped) not in keys[t] for t in targets):
            raise UserError(f"{override}: no such key in {script or 'any pipeline script'}; scripts: "
                            f"{', '.join(keys)}")
        for target in targets:
            given[target].append(scoped)
    return given


def chains(args, given: dict[str, list[str]]) -> list[Chain]:
    """Every chain of the study, its steps named and composed (which checks every setting before any work)."""
    seeds = split_values(args.seed)
    if not all(seed.lstrip("-").isdigit() for seed in seeds):
        raise UserError(f"--seed {' '.join(seeds)}: seeds are integers")
    if seeds and any(root_key(o) == "seed" for overrides in given.values() for o in overrides):
        raise UserError("seed= among the overrides and --seed: give the seeds once, by --seed")
    models = split_values(args.model)
    if models and any(o.split("=", 1)[0].lstrip("+~") == "model" for overrides in given.values() for o in overrides):
        raise UserError("model= among the overrides and --model: give the models once, by --model")
    name, found = args.name, []
    for dataset, model, seed in itertools.product(split_values(args.dataset), models or [None], seeds or [None]):
        axes = [f"dataset={dataset}", *([f"model={model}"] if model else []),
                *([f"seed={seed}"] if seed is not None else [])]
        first = compose(SCRIPTS[TRAINING[0]], [*axes, *given[TRAINING[0]]])
        model_name, seed_value = str(first.model.name), int(first.seed)
        folder = (args.out or Path("logs") / "pipeline" / name) / f"{dataset}_{model_name}_s{seed_value}"
        chain = Chain(dataset, model_name, seed_value, folder)

        def run_name(step):
            return f"{name}_{dataset}_{model_name}_{step}_s{seed_value}"

        for script in TRAINING:
            inputs = [f"{INPUTS[script][0]}={run_name(INPUTS[script][1])}"] if script in INPUTS else []
            overrides = [*axes, *given[script], *inputs, f"name={run_name(script)}"]
            chain.training.append(Step(script, run_name(script), overrides, folder / "train" / script,
                                       compose(SCRIPTS[script], overrides)))
        evaluation = compose(SCRIPTS[EVALUATION], [*axes, *given[EVALUATION]])  # the same but for its input
        for trained in TRAINING:
            inputs = {"pretrained_model": run_name(trained), "name": run_name(f"eval_{trained}")}
            overrides = [*axes, *given[EVALUATION], *(f"{k}={v}" for k, v in inputs.items())]
            chain.evaluations.append(Step(EVALUATION, inputs["name"], overrides, folder / "eval" / trained,
                                          OmegaConf.merge(evaluation, inputs)))
        found.append(chain)
    return found


def last_checkpoint(step: Step) -> Path:
    return Path(step.cfg.checkpoint_dir) / step.cfg.name / "last.pt"


def scored_checkpoint_unchanged(results: Path) -> bool:
    """meta_eval's results.json scored the checkpoint that is there now (its sha256; results written before it was
    recorded count as current)."""
    try:
        about = json.loads(results.read_text())
    except (OSError, ValueError):
        return False
    recorded, path = about.get("checkpoint_sha256"), Path(str(about.get("checkpoint", "")))
    return recorded is None or (path.is_file() and file_identity(path) == recorded)


def plan(chain: Chain) -> None:
    """Set each step's action. Training: skip a finished run, restart one older than its input, else run (a new
    run, or the continuation of an interrupted one); a run with other settings than asked is an error. meta_eval:
    skip when its results are newer than the checkpoint it scores and were made with the same settings."""
    runs_now = set()
    by_script = {step.script: step for step in chain.training}

    def older_than_input(path: Path, upstream: Step) -> bool:
        return upstream.script in runs_now or last_checkpoint(upstream).stat().st_mtime > path.stat().st_mtime

    for step in chain.training:
        last = last_checkpoint(step)
        upstream = by_script[INPUTS[step.script][1]] if step.script in INPUTS else None
        if step.cfg.overwrite or not last.is_file():
            step.action = "run"
        elif upstream is not None and older_than_input(last, upstream):
            step.action = "restart"
        else:
            payload = load_checkpoint(last, fix=f"delete {last.parent} or run the pipeline with overwrite=true")
            if payload.get("script") != step.script:
                raise UserError(f"{last} was written by {payload.get('script')}.py, not {step.script}.py: give the "
                                f"pipeline another --name")
            if changed := changed_setting(payload["config"], step.cfg, SCRIPTS[step.script]):
                key, saved, asked = changed
                raise UserError(f"{step.script}: run {step.name} exists with {key}={saved} (asked: {asked}): give "
                                f"the pipeline another --name, or overwrite=true to run every step again")
            done, asked = payload["epoch"] + 1, int(step.cfg.epochs)
            if done > asked or (done == asked and payload.get("position") is not None):
                raise UserError(f"{step.script}: run {step.name} already has {done} epochs (asked: epochs={asked}): "
                                f"give {step.script}:epochs={done}, the pipeline another --name, or overwrite=true "
                                f"to run every step again")
            step.action = "skip" if done == asked else "run"  # finished: the checks above leave no position
        if step.action != "skip":
            runs_now.add(step.script)
    for step, trained in zip(chain.evaluations, chain.training):
        results, config = step.run_dir / "results.json", step.run_dir / "config.yaml"
        up_to_date = results.is_file() and config.is_file() and not older_than_input(results, trained) \
            and scored_checkpoint_unchanged(results)
        current = up_to_date and not changed_setting(config.read_text(), step.cfg, SCRIPTS[step.script])
        step.action = "skip" if current else "run"


def launch(python: str, step: Step) -> None:
    args = [*step.overrides, f"hydra.run.dir={step.run_dir}"]
    print(f"\n==> {step.script}.py {' '.join(args)}", flush=True)
    done = subprocess.run([python, str(ROOT / f"{step.script}.py"), *args])
    if done.returncode:
        raise UserError(f"{step.script}.py failed (exit status {done.returncode}); the pipeline stops there: "
                        f"the same command continues it")


def run_chain(chain: Chain, python: str) -> None:
    for step in chain.training:
        if step.action == "skip":
            print(f"skipping {step.script}: {step.name} is finished", flush=True)
            continue
        if step.action == "restart":
            upstream = INPUTS[step.script][1]
            print(f"restarting {step.script}: {step.name} is older than its input {upstream}", flush=True)
            step.overrides.append("overwrite=true")
        launch(python, step)
    for step in chain.evaluations:
        if step.action == "skip":
            print(f"skipping {step.script} of {step.cfg.pretrained_model}: {step.run_dir / 'results.json'} is up to "
                  f"date", flush=True)
            continue
        launch(python, step)
    results = {LABELS[trained]: read_results(step.run_dir / "results.json")
               for trained, step in zip(TRAINING, chain.evaluations)}
    print(f"\n{chain.dataset}, {chain.model}, seed {chain.seed}: meta_eval accuracy (%) with 95% intervals over "
          f"tasks\n{results_table(results)}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", nargs="+", required=True, help="dataset= of every step (several: a loop)")
    parser.add_argument("--model", nargs="+", help="model= of every step (several: a loop)")
    parser.add_argument("--seed", nargs="+", help="seed= of every step (several: a loop)")
    parser.add_argument("--name", default="pipeline", help="first part of the run names (default: pipeline)")
    parser.add_argument("--out", type=Path, help="where the run directories go (default: logs/pipeline/NAME)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs the scripts")
    parser.add_argument("overrides", nargs="*", help="key=value for every step that has the key")
    args = parser.parse_args(argv)
    try:
        if "/" in args.name or not args.name.strip():
            raise UserError(f"--name {args.name!r}: a run name has no '/' and is not empty")
        study = chains(args, distribute(args.overrides, script_keys()))
        for chain in study:
            plan(chain)
        for chain in study:
            run_chain(chain, args.python)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    if len(study) > 1:
        print(f"\n{len(study)} chains done: python -m tools.report '{study[0].folder.parent}/*/eval' tabulates "
              f"them over seeds", flush=True)


if __name__ == "__main__":
    main()
