"""The papers' studies: the Hydra presets sweep the papers' grids, the MeLa study driver (tools.pipeline) names,
places, skips and restarts its steps, and each study runs at toy scale through its make target, ending with the
report's table, comparisons and figure."""
import argparse
import itertools
import json
import os

import numpy as np
import pytest
import scipy.stats
import torch
import yaml
from conftest import ROOT
from docs_blocks import marked_blocks, run_block
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from engine.entry import CONFIG_DIR, compose, register
from methods.scripts import SCRIPTS
from tools import pipeline

LEVEL_PAIRS = [(3, 10), (3, 20), (3, 100), (10, 20), (10, 100), (20, 100)]
PSI = [2, 5, 10, 20, 50, 100]
# Tiny and fast; threads=1: two test processes share two cores
TOY = ["epochs=1", "model.width_mult=0.125", "device=cpu", "num_workers=0", "progress=false", "threads=1"]
TOY_HIER = [*TOY, "dataset=synthetic_hier", "dataset.generate.train_per_class=1", "dataset.generate.test_per_class=1",
            "batch_size=100"]
TOY_FS = [*TOY, "test_db_size=5", "n_queries=5", "dataset.generate.images_per_class=10",
          "dataset.generate.classes={train:8,val:5,test:5}", "batch_size=50", "learn_labeler:K=10",
          "learn_labeler:no_replacement=false", "learn_labeler:train_db_size=10", "learn_labeler:std_factor=10",
          "learn_labeler:sup_rotate_aug=false", "sup_baseline:rotate_aug=false"]


def preset(name: str, *overrides: str):
    register(SCRIPTS["maxl_train"])
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return hydra_compose("maxl_train", overrides=[f"+experiment={name}", *overrides], return_hydra_config=True)


def interval(values):
    values = np.asarray(values, dtype=float)
    return scipy.stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=scipy.stats.sem(values))


# ---- the presets' grids -------------------------------------------------------------------------------------

def test_maxl_hierarchies_sweeps_the_six_level_pairs_four_methods_and_three_seeds(workspace):
    params = preset("maxl_hierarchies").hydra.sweeper.params
    assert params["method"] == "single,human,random,maxl" and params["seed"] == "0,1,2"
    pairs = []
    for option in params["experiment/levels"].split(","):
        cfg = compose(SCRIPTS["maxl_train"], ["+experiment=maxl_hierarchies", f"experiment/levels={option}"])
        assert cfg.dataset.name == "cifar100" and cfg.psi is None  # psi follows the hierarchy
        pairs.append((cfg.primary_level, cfg.auxiliary_level))
    assert pairs == LEVEL_PAIRS


def test_maxl_psi_sweeps_maxl_over_psi_with_single_as_reference(workspace):
    params = preset("maxl_psi").hydra.sweeper.params
    assert params["seed"] == "0,1,2"
    arms = []
    for option in params["experiment/psi"].split(","):
        cfg = compose(SCRIPTS["maxl_train"], ["+experiment=maxl_psi", f"experiment/psi={option}"])
        assert cfg.dataset.name == "cifar10"
        arms.append((cfg.method, cfg.psi))
    assert arms == [("single", None)] + [("maxl", k) for k in PSI]


def test_presets_leave_every_axis_and_the_dataset_to_the_command_line(workspace):
    cfg = preset("maxl_hierarchies", "dataset=synthetic_hier", "experiment/levels=3-100", "method=human")
    assert (cfg.dataset.name, cfg.primary_level, cfg.auxiliary_level, cfg.method) == ("synthetic_hier", 3, 100,
                                                                                      "human")


# ---- the MeLa study driver ----------------------------------------------------------------------------------

def study_args(*extra):
    return argparse.Namespace(
        dataset=["synthetic_fs"], model=["resnet12", "resnet18"], seed=["0,1"], name="s", out=None, python="python",
        overrides=[*TOY_FS, *extra])


def planned(args):
    chains = pipeline.chains(args, pipeline.distribute(args.overrides, pipeline.script_keys()))
    for chain in chains:
        pipeline.plan(chain)
    return chains


def fake_checkpoint(step, epoch=0, position=None, **changed):
    """A last.pt as the engine writes it for this step's settings (changed: other values)."""
    cfg = OmegaConf.to_container(step.cfg, resolve=True)
    cfg.update(changed)
    path = pipeline.last_checkpoint(step)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"script": step.script, "epoch": epoch, "position": position, "config": OmegaConf.to_yaml(cfg),
                "state": {}}, path)
    return path


def test_chains_loop_over_datasets_models_seeds_with_names_and_folders(workspace):
    chains = planned(study_args())
    assert [(c.dataset, c.model, c.seed) for c in chains] == list(itertools.product(["synthetic_fs"],
                                                                                    ["resnet12", "resnet18"], [0, 1]))
    chain = chains[3]
    assert [s.name for s in chain.training] == [f"s_synthetic_fs_resnet18_{step}_s1" for step in pipeline.TRAINING]
    folder = pipeline.Path("logs/pipeline/s/synthetic_fs_resnet18_s1")
    assert [s.run_dir for s in chain.training] == [folder / "train" / step for step in pipeline.TRAINING]
    assert [s.run_dir for s in chain.evaluations] == [folder / "eval" / step for step in pipeline.TRAINING]
    labeler, fine_tune = chain.training[1].cfg, chain.training[2].cfg
    assert labeler.pretrained_labeler == "s_synthetic_fs_resnet18_learn_meta_repr_s1"
    assert fine_tune.pretrained_model == "s_synthetic_fs_resnet18_learn_labeler_s1"
    assert (labeler.model.name, labeler.seed, labeler.K, fine_tune.epochs) == ("resnet18", 1, 10, 1)
    assert [e.cfg.pretrained_model for e in chain.evaluations] == [s.name for s in chain.training]
    assert all(s.action == "run" for c in chains for s in (*c.training, *c.evaluations))


def actions(chain):
    pipeline.plan(chain)
    return [step.action for step in chain.training]


def test_finished_steps_are_skipped_unfinished_ones_run_and_their_dependants_restart(workspace):
    args = study_args()
    args.model, args.seed = ["resnet12"], ["0"]
    [chain] = planned(args)
    meta_repr = chain.training[0]
    for step in chain.training:
        fake_checkpoint(step)  # epochs=1: epoch 0 is the last
    assert actions(chain) == ["skip"] * 4
    fake_checkpoint(meta_repr, epoch=-1, position={"epoch": 0, "phase": 0, "step": 3})  # stopped inside an epoch
    assert actions(chain) == ["run", "restart", "restart", "skip"]
    for step, written in zip(chain.training, (100, 200, 150, 100)):  # fine_tune is older than its labeler
        os.utime(fake_checkpoint(step), (written, written))
    assert actions(chain) == ["skip", "skip", "restart", "skip"]
    fake_checkpoint(chain.training[1], lam=0.5)
    with pytest.raises(pipeline.UserError, match="learn_labeler: run s_synthetic_fs_resnet12_learn_labeler_s0 "
                                                 "exists with lam=0.5 \\(asked: 0.001\\)"):
        pipeline.plan(chain)
    args.overrides.append("overwrite=true")
    assert [s.action for s in planned(args)[0].training] == ["run"] * 4


def test_a_finished_step_with_more_epochs_than_asked_is_not_the_asked_run(workspace):
    args = study_args()
    args.model, args.seed = ["resnet12"], ["0"]
    [chain] = planned(args)
    for step in chain.training:
        fake_checkpoint(step)
    fake_checkpoint(chain.training[0], epoch=2)  # 3 epochs; the study asks for 1
    with pytest.raises(pipeline.UserError, match="learn_meta_repr: run s_synthetic_fs_resnet12_learn_meta_repr_s0 "
                                                 "already has 3 epochs \\(asked: epochs=1\\)"):
        pipeline.plan(chain)


def test_meta_eval_is_skipped_when_its_results_are_newer_and_of_the_same_settings(workspace, tmp_path):
    args = study_args()
    args.model, args.seed = ["resnet12"], ["0"]
    [chain] = planned(args)
    for step in chain.training:
        os.utime(fake_checkpoint(step), (100, 100))
    for step in chain.evaluations:
        step.run_dir = tmp_path / step.run_dir
        step.run_dir.mkdir(parents=True)
        (step.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(step.cfg, resolve=True))
        (step.run_dir / "results.json").write_text("{}")
    pipeline.plan(chain)
    assert [step.action for step in chain.evaluations] == ["skip"] * 4
    os.utime(chain.evaluations[2].run_dir / "results.json", (50, 50))  # older than fine_tune's checkpoint
    (chain.evaluations[3].run_dir / "config.yaml").write_text(OmegaConf.to_yaml(
        {**OmegaConf.to_container(chain.evaluations[3].cfg, resolve=True), "test_db_size": 600}))
    pipeline.plan(chain)
    assert [step.action for step in chain.evaluations] == ["skip", "skip", "run", "run"]


@pytest.mark.parametrize("overrides, message", [
    (["dataset=miniImageNet"], "error: dataset=miniImageNet: the pipeline sets dataset itself (give the datasets "
                               "by --dataset)"),
    (["name=x"], "error: name=x: the pipeline sets name itself (give its first part by --name)"),
    (["fine_tune:pretrained_model=x"], "error: fine_tune:pretrained_model=x: the pipeline sets pretrained_model "
                                       "itself (to the previous step's run)"),
    (["seed=3"], "error: seed= among the overrides and --seed"),
    (["lamda=0.1"], "error: lamda=0.1: no such key in any pipeline script"),
])
def test_bad_study_arguments_are_one_line_errors(workspace, capsys, overrides, message):
    with pytest.raises(SystemExit) as stop:
        pipeline.main(["--dataset", "synthetic_fs", "--seed", "0", "--", *overrides])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.startswith(message) and err.count("\n") == 1, err


# ---- the studies at toy scale, through make -------------------------------------------------------------------

def summaries(study):
    runs = {}
    for config in study.glob("*/config.yaml"):
        cfg = yaml.safe_load(config.read_text())
        runs[config.parent] = (cfg, json.loads((config.parent / "summary.json").read_text())["test/acc_last5_mean"])
    return runs


def check_groups(document, runs, keys):
    """Each group of the report's JSON holds the runs with its settings; its mean and interval are scipy's."""
    for group in document["groups"]:
        values = [acc for cfg, acc in runs.values()
                  if all(("null" if cfg[k] is None else str(cfg[k])) == group["settings"][k] for k in keys)]
        stats = group["metrics"]["test/acc_last5_mean"]
        assert stats["n"] == len(values) and stats["mean"] == pytest.approx(np.mean(values), abs=1e-9)
        if len(values) > 1:  # equal values (a toy run at chance level): an interval of width 0
            expected = interval(values) if np.ptp(values) else (values[0], values[0])
            assert (stats["low"], stats["high"]) == pytest.approx(expected, abs=1e-9)


# The documentation's toy-scale commands (docs/experiments.md, blocks marked `sh toy NAME`), run as printed
RUN_HERE = ("maxl_studies", "mela_study")


@pytest.fixture(scope="module")
def maxl_studies(tmp_path_factory):
    """`make maxl_hierarchies` (one level pair, the four methods, two seeds) and `make maxl_psi` (maxl at two psi and
    the single reference, one seed) with the toy settings of docs/experiments.md, in a copy of the project."""
    copy, output = run_block(marked_blocks()["maxl_studies"], tmp_path_factory.mktemp("maxl_studies"))
    return {target: next((copy / "logs" / "studies" / target).iterdir()) for target in ("maxl_hierarchies",
                                                                                       "maxl_psi")}, output


def test_the_documented_toy_settings_are_those_of_these_tests():
    blocks = marked_blocks()
    assert " ".join(TOY_HIER) in " ".join(blocks["maxl_studies"].text.split())
    assert " ".join(TOY_FS) in " ".join(blocks["mela_study"].text.split())


def test_maxl_hierarchies_study_at_toy_scale(maxl_studies):
    """One level pair, the four methods, two seeds (the whole grid's contents are checked above)."""
    folders, output = maxl_studies
    study = folders["maxl_hierarchies"]
    runs = summaries(study)
    assert sorted((c["primary_level"], c["auxiliary_level"], c["method"], c["seed"]) for c, _ in runs.values()) == \
        sorted((3, 100, m, s) for m, s in itertools.product(["single", "human", "random", "maxl"], [0, 1]))
    document = json.loads((study / "table.json").read_text())
    assert document["settings"] == ["method"] and len(document["groups"]) == 4
    check_groups(document, runs, ["method"])
    comparisons = {(c["a_label"], c["b_label"]): c for c in document["comparisons"]}
    assert set(comparisons) == {("method=maxl", "method=single"), ("method=maxl", "method=human")}
    for other in ("single", "human"):
        per_seed = {m: {c["seed"]: acc for c, acc in runs.values() if c["method"] == m} for m in ("maxl", other)}
        diffs = [per_seed["maxl"][s] - per_seed[other][s] for s in (0, 1)]
        comparison = comparisons[("method=maxl", f"method={other}")]
        assert comparison["n"] == 2 and comparison["mean"] == pytest.approx(np.mean(diffs), abs=1e-9)
    assert (study / "table.csv").is_file() and (study / "test_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "8 runs in 4 groups" in output


def test_maxl_psi_study_at_toy_scale(maxl_studies):
    """maxl at two psi and the single reference, one seed."""
    study = maxl_studies[0]["maxl_psi"]
    runs = summaries(study)
    assert sorted((c["method"], c["psi"] or 0) for c, _ in runs.values()) == [("maxl", 2), ("maxl", 100), ("single", 0)]
    document = json.loads((study / "table.json").read_text())
    assert document["settings"] == ["method", "psi"]
    check_groups(document, runs, ["method", "psi"])
    single = next(acc for c, acc in runs.values() if c["method"] == "single")
    comparisons = document["comparisons"]
    assert [c["a_label"] for c in comparisons] == [f"method=maxl psi={k}" for k in (2, 100)]
    for comparison, k in zip(comparisons, (2, 100)):
        maxl = next(acc for c, acc in runs.values() if c["psi"] == k)
        assert comparison["b_label"] == "method=single psi=null" and comparison["n"] == 1
        assert comparison["mean"] == pytest.approx(maxl - single, abs=1e-9)


def test_mela_study_at_toy_scale_then_the_same_command_skips_everything(tmp_path, monkeypatch, capsys):
    """One dataset, one model, one seed (the loop over them is checked above), as docs/experiments.md runs it."""
    copy, _ = run_block(marked_blocks()["mela_study"], tmp_path)
    study = copy / "logs" / "pipeline" / "toy"
    monkeypatch.setenv("WORKSPACE", str(tmp_path / "workspace"))
    monkeypatch.chdir(copy)
    chain = study / "synthetic_fs_resnet12_s0"
    document = json.loads((study / "table.json").read_text())
    assert document["settings"] == ["evaluated"] and document["metrics"] == ["test/1shot", "test/5shot"]
    for group in document["groups"]:
        results = json.loads((chain / "eval" / group["settings"]["evaluated"] / "results.json").read_text())
        for shots in ("1", "5"):
            assert group["metrics"][f"test/{shots}shot"]["mean"] == results["results"][shots]["overall"]["mean"]
    assert {(c["a_label"], c["b_label"]) for c in document["comparisons"]} == {
        ("evaluated=learn_labeler", "evaluated=learn_meta_repr"), ("evaluated=fine_tune", "evaluated=sup_baseline")}
    assert (study / "validation.png").read_bytes()[:4] == b"\x89PNG"
    written = {path: path.stat().st_mtime for path in chain.rglob("*") if path.is_file()}

    pipeline.main(["--name", "toy", "--out", str(study), "--dataset", "synthetic_fs", "--model", "resnet12",
                   "--seed", "0", "--", *TOY_FS])
    again = capsys.readouterr().out
    for step in pipeline.TRAINING:
        assert f"skipping {step}: toy_synthetic_fs_resnet12_{step}_s0 is finished" in again
        assert f"skipping meta_eval of toy_synthetic_fs_resnet12_{step}_s0" in again
    assert "==>" not in again
    assert {path: path.stat().st_mtime for path in chain.rglob("*") if path.is_file()} == written


# ---- `make pipeline` as given: the labeler's defaults follow the dataset ----------------------------------------

def test_every_mela_dataset_carries_labeler_defaults_that_fit_it(workspace):
    """K a multiple of n_ways (15: 3- and 5-way tasks); on the generated and small datasets random tasks, enough
    for the K / n_ways tasks the initial centroids take; on the real ones the original's values. The defaults of
    the chosen dataset name no run differently (no hash in the name)."""
    from dataset.fewshot.config import mela_dataset_names

    for name in mela_dataset_names():
        labeler = yaml.safe_load((ROOT / "config" / "dataset" / f"{name}.yaml").read_text())["labeler"]
        assert set(labeler) == {"K", "train_db_size", "no_replacement"}, name
        if labeler["no_replacement"]:  # the original's values; fc100's 60 training classes keep 6.25 per class
            assert (labeler["K"], labeler["train_db_size"]) == (375 if name == "fc100" else 400, None), name
        else:
            assert labeler["K"] % 15 == 0 and labeler["train_db_size"] >= labeler["K"] // 3, name
    cfg = compose(SCRIPTS["learn_labeler"], ["dataset=synthetic_fs"])
    assert (cfg.K, cfg.train_db_size, cfg.no_replacement) == (30, 50, False)
    assert cfg.name == "labeler_resnet12_synthetic_fs_f50_nways5_nshots5_q3.5_3_s0"
    assert compose(SCRIPTS["learn_labeler"], ["dataset=synthetic_fs", "K=45"]).name.startswith(f"{cfg.name}_")
    assert compose(SCRIPTS["learn_labeler"], ["dataset=miniImageNet"]).name == \
        "labeler_resnet12_miniImageNet_nways5_nshots5_no-replace_q3.5_3_s0"  # as before the per-dataset defaults


def test_the_keys_the_pipeline_hands_out_are_those_of_each_scripts_config():
    for script, keys in pipeline.script_keys().items():
        assert keys == set(compose(SCRIPTS[script], ["dataset=synthetic_fs"]).keys()) | {"hydra"}, script


@pytest.mark.parametrize("overrides", [[], ["epochs=1", "model.width_mult=0.125"]])
def test_make_pipeline_plans_its_default_chain(workspace, overrides):
    """`make pipeline` (synthetic_fs) and `make pipeline ARGS='epochs=1 model.width_mult=0.125'`: every step
    composes and validates; the labeler's K needs no more tasks than it gets."""
    args = argparse.Namespace(dataset=["synthetic_fs"], model=None, seed=None, name="pipeline", out=None,
                              python="python", overrides=overrides)
    [chain] = pipeline.chains(args, pipeline.distribute(overrides, pipeline.script_keys()))
    pipeline.plan(chain)
    labeler = chain.training[1].cfg
    assert labeler.K // labeler.n_ways <= labeler.train_db_size and not labeler.no_replacement
    assert [s.action for s in chain.training] == ["run"] * 4
