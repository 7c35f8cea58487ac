"""Settings are checked before any work starts: each bad value is one line naming the key, the value and what the
key takes; checks against the data when an evaluator is built; the workspace and the SLURM launcher; --help."""
import os
import string

import pytest
from conftest import ROOT, one_line_error, run_in_process
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from dataset.catalog import dataset_names
from engine.config import CONFIG_DIR
from engine.entry import check_launcher, register
from engine.errors import UserError
from engine.settings import check_workspace, declared, validate
from methods.fewshot_eval import FewShotEvaluator
from methods.scripts import SCRIPTS as ALL
from models import model_settings

SCRIPTS = tuple(ALL)
VIEW = {name: "maxl" if name == "maxl_train" else "mela" for name in SCRIPTS}
PSI = ("psi must be null (derived from the hierarchy), an integer >= 1 or a list of integers >= 1, e.g. [5,5,...] "
       "(one count per primary class)")
FOLDER_NAME = "(one folder name: not '.' or '..', without '/', '\\' or whitespace)"
RUN_NAME = f"a run name {FOLDER_NAME}"
HIERARCHICAL = "cifar10, cifar100, digits, hier_file or synthetic_hier"
FEW_SHOT = ("cifar_fs, custom, digits, fc100, h_aircraft, mini60, miniImageNet, mixed, synthetic_fs, synthetic_hard_fs, "
            "tiered780 or tieredImageNet")


def composed(script: str, overrides=()):
    """The config as Hydra composes it for a run of `script` (its hydra node included), not yet validated."""
    register(ALL[script])
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return hydra_compose(script, overrides=list(overrides), return_hydra_config=True)


def error_of(script: str, *overrides: str) -> str:
    with pytest.raises(UserError) as caught:
        validate(composed(script, overrides), ALL[script])
    return str(caught.value)


@pytest.fixture(autouse=True)
def _workspace(workspace):
    return workspace  # every config resolves its paths under a fresh $WORKSPACE


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_defaults_of_every_script_are_valid(script):
    assert validate(composed(script), ALL[script]) is None


@pytest.mark.parametrize("script, overrides", [
    ("maxl_train", ["model=resnet12"]),  # MAXL takes every backbone
    ("maxl_train", ["psi=5", "dataset=cifar10"]),
    ("maxl_train", ["psi=[2,3,1]", "lr=1e-3", "threads=4", "resume=true", "checkpoint_every=0.5"]),
    ("maxl_train", ["dataset=digits", "auxiliary_level=null", "method=single"]),
    ("learn_meta_repr", ["lr_decay_epochs='17,22'", "val_n_shots=[1,5]", "name=my_run", "trial=abc"]),
    ("learn_labeler", ["K=20", "n_ways=5", "std_factor=0", "pretrained_labeler=some/run.pt"]),
    ("meta_eval", ["split=val", "dataset=digits", "n_ways=3"]),
])
def test_good_settings_pass(script, overrides):
    assert validate(composed(script, overrides), ALL[script]) is None


def test_hier_file_levels_are_read_from_its_labels(tmp_path):
    import numpy as np

    labels = np.stack([np.arange(8) // 4, np.arange(8) // 2], axis=1)  # 2 coarse classes over 4 fine ones
    for split in ("train", "test"):
        np.savez(tmp_path / f"{split}.npz", data=np.zeros((8, 8, 8, 3), np.uint8), labels=labels)
    cfg = composed("maxl_train", ["dataset=hier_file", f"dataset.path={tmp_path}"])  # levels: auto
    assert validate(cfg, ALL["maxl_train"]) is None
    assert (cfg.dataset.primary_level, cfg.dataset.auxiliary_level) == (2, 4)


@pytest.mark.parametrize("script, overrides, message", [
    # maxl_train
    ("maxl_train", ["psi=abc"], f"psi=abc: {PSI}"),
    ("maxl_train", ["psi=2.5"], f"psi=2.5: {PSI}"),
    ("maxl_train", ["psi=[2.7,3,3,3,3,3]"], f"psi=[2.7, 3, 3, 3, ...]: {PSI}"),  # no longer truncated to 2
    ("maxl_train", ["psi=0"], f"psi=0: {PSI}"),
    ("maxl_train", ["lr=-1"], "lr=-1: lr must be a number > 0"),
    ("maxl_train", ["lr=fast"], "lr=fast: lr must be a number > 0"),
    ("maxl_train", ["epochs=0"], "epochs=0: epochs must be an integer >= 1"),
    ("maxl_train", ["epochs=abc"], "epochs=abc: epochs must be an integer >= 1"),
    ("maxl_train", ["epochs=2.5"], "epochs=2.5: epochs must be an integer >= 1"),
    ("maxl_train", ["batch_size=0"], "batch_size=0: batch_size must be an integer >= 1"),
    ("maxl_train", ["num_workers=-1"], "num_workers=-1: num_workers must be auto or an integer >= 0"),
    ("maxl_train", ["method=maxxl"],
     "method=maxxl: method must be one of single, human, random, maxl, maxl_first_order"),
    ("maxl_train", ["model.width_mult=0"], "model.width_mult=0: model.width_mult must be a number > 0"),
    ("maxl_train", ["model.width_mult=-0.5"], "model.width_mult=-0.5: model.width_mult must be a number > 0"),
    ("maxl_train", ["dataset=synthetic_fs"],
     f"dataset=synthetic_fs is a few-shot dataset without a label hierarchy: maxl_train.py takes dataset="
     f"{HIERARCHICAL}"),
    ("maxl_train", ["primary_level=0"], "primary_level=0: primary_level must be auto or an integer >= 1"),
    ("maxl_train", ["dataset=hier_file", "dataset.path=/data", "dataset.auxiliary_level=ten"],
     "dataset.auxiliary_level=ten: dataset.auxiliary_level must be auto, null (primary task only) or an integer >= 1"),
    ("maxl_train", ["primary_level=${nope}"],
     "primary_level=${nope} cannot be resolved (Interpolation key 'nope' not found): give primary_level a value"),
    # the engine's keys, in any script
    ("maxl_train", ["device=tpu"], "device=tpu: device must be one of auto, cpu, cuda"),
    ("learn_meta_repr", ["precision=fp16"], "precision=fp16: precision must be one of auto, fp32, bf16"),
    ("sup_baseline", ["compile=yes"], "compile=yes: compile must be one of auto, true, false"),
    ("sup_baseline", ["compile=1"], "compile=1: compile must be one of auto, true, false"),
    ("maxl_train", ["progress=yes"], "progress=yes: progress must be true or false"),
    ("learn_meta_repr", ["data_aug='true'"], "data_aug='true': data_aug must be true or false"),
    ("fine_tune", ["overwrite=1"], "overwrite=1: overwrite must be true or false"),
    ("maxl_train", ["seed=-1"], "seed=-1: seed must be an integer >= 0"),
    ("maxl_train", ["resume=maybe"], "resume=maybe: resume must be one of auto, true, false"),
    ("maxl_train", ["checkpoint_every=-1"], "checkpoint_every=-1: checkpoint_every must be a number >= 0"),
    ("maxl_train", ["threads=0"], "threads=0: threads must be auto or an integer >= 1"),
    ("maxl_train", ["threads=many"], "threads=many: threads must be auto or an integer >= 1"),
    ("maxl_train", ["lock_stale_hours=0"], "lock_stale_hours=0: lock_stale_hours must be a number > 0"),
    ("maxl_train", ["name=a/b"], f"name=a/b: name must be {RUN_NAME}"),
    ("maxl_train", ["name='my run'"], f"name=my run: name must be {RUN_NAME}"),
    ("maxl_train", ["name=''"], f"name='': name must be {RUN_NAME}"),
    ("maxl_train", ["name=null"], f"name=null: name must be {RUN_NAME}"),
    ("learn_meta_repr", ["trial=a/b"],
     f"trial=a/b: trial must be an integer or a name {FOLDER_NAME}"),
    ("maxl_train", ["run_prefix=x/y"], f"run_prefix=x/y: run_prefix must be {RUN_NAME}"),
    # the MeLa scripts
    ("learn_meta_repr", ["dataset=cifar100"],
     f"dataset=cifar100 is a dataset with a label hierarchy (for maxl_train.py), without few-shot splits: "
     f"learn_meta_repr.py takes dataset={FEW_SHOT}"),
    ("meta_eval", ["dataset=synthetic_hier"],
     f"dataset=synthetic_hier is a dataset with a label hierarchy (for maxl_train.py), without few-shot splits: "
     f"meta_eval.py takes dataset={FEW_SHOT}"),
    ("learn_meta_repr", ["tasks_per_step=0"], "tasks_per_step=0: tasks_per_step must be an integer >= 1"),
    ("learn_meta_repr", ["learning_rate=-1"], "learning_rate=-1: learning_rate must be a number > 0"),
    ("learn_meta_repr", ["lr_decay_epochs=abc"],
     "lr_decay_epochs=abc: lr_decay_epochs must be a list of integers >= 0, e.g. [17,22]"),
    ("sup_baseline", ["lr_decay_epochs=[]"],
     "lr_decay_epochs=[]: lr_decay_epochs must be a list of integers >= 0, e.g. [17,22]"),
    ("learn_meta_repr", ["val_n_shots=abc"],
     "val_n_shots=abc: val_n_shots must be a list of integers >= 1, e.g. [1,5]"),
    ("meta_eval", ["val_n_shots=[1,0]"], "val_n_shots=[1, 0]: val_n_shots must be a list of integers >= 1, e.g. [1,5]"),
    ("learn_meta_repr", ["n_ways=0"], "n_ways=0: n_ways must be an integer >= 1"),
    ("fine_tune", ["n_shots=0"], "n_shots=0: n_shots must be an integer >= 1"),
    ("sup_baseline", ["n_queries=0"], "n_queries=0: n_queries must be an integer >= 1"),
    ("learn_meta_repr", ["val_n_ways=-2"], "val_n_ways=-2: val_n_ways must be an integer >= 1"),
    ("learn_meta_repr", ["momentum=1"], "momentum=1: momentum must be a number in [0, 1)"),
    ("learn_meta_repr", ["positive_pairs=all"],
     "positive_pairs=all: positive_pairs must be one of same_set, same_class"),
    ("learn_meta_repr", ["train_db_size=0"],
     "train_db_size=0: train_db_size must be null (the whole partition, or 2800 random tasks) or an integer >= 1"),
    ("learn_labeler", ["K=0"], "K=0: K must be an integer >= 1"),
    ("learn_labeler", ["K=401"], "K=401: K must be a positive multiple of n_ways=5 (e.g. K=400)"),
    ("learn_labeler", ["K=3", "n_ways=5"], "K=3: K must be a positive multiple of n_ways=5 (e.g. K=5)"),
    ("learn_labeler", ["std_factor=-0.5"], "std_factor=-0.5: std_factor must be a number >= 0"),
    ("learn_labeler", ["lam=0"], "lam=0: lam must be a number > 0"),
    ("meta_eval", ["split=valid"], "split=valid: split must be one of train, val, test"),
    ("meta_eval", ["pretrained_model=''"], "pretrained_model='': pretrained_model must be null (not set) or the "
                                           "run name or .pt path of a checkpoint"),
    ("fine_tune", ["model.drop_rate=1"], "model.drop_rate=1: model.drop_rate must be a number in [0, 1)"),
    ("fine_tune", ["model.dropblock=exact"],
     "model.dropblock=exact: model.dropblock must be one of correct, reference"),
    ("learn_meta_repr", ["dataset.std=[0.5,0,0.5]"],
     "dataset.std=[0.5, 0, 0.5]: dataset.std must be a list of 3 numbers, each > 0"),
    ("learn_meta_repr", ["dataset=custom"], "dataset.path is required for dataset=custom: give dataset.path=..."),
])
def test_a_bad_setting_is_one_line_naming_key_value_and_fix(script, overrides, message):
    assert error_of(script, *overrides) == message


def _missing_keys(dataset: str) -> list[str]:
    config = OmegaConf.load(CONFIG_DIR + f"/dataset/{dataset}.yaml")
    return [key for key in config if OmegaConf.is_missing(config, key)]


def test_a_missing_mandatory_dataset_key_is_named_before_anything_resolves_it():
    """maxl_train's top-level primary_level interpolates dataset.primary_level: the missing key itself is named."""
    missing = _missing_keys("hier_file")
    assert missing, "hier_file has mandatory keys"
    assert error_of("maxl_train", "dataset=hier_file") == \
        f"dataset.{missing[0]} is required for dataset=hier_file: give dataset.{missing[0]}=..."


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_composed_keys_are_the_declared_ones(script):
    cfg = composed(script)
    top = [key for key in cfg.keys() if key not in ("dataset", "model", "hydra")]
    assert top == list(declared(ALL[script].settings))  # the declarations' order
    for model in sorted(p.stem for p in (ROOT / "config" / "model").glob("*.yaml")):
        node = OmegaConf.load(ROOT / "config" / "model" / f"{model}.yaml")
        assert list(node.keys()) == list(declared(model_settings(node))), model


def test_every_declared_group_key_is_in_some_option():
    keys = set()
    for group in ("model", "dataset"):
        for path in (ROOT / "config" / group).glob("*.yaml"):
            keys |= {f"{group}.{k}" for k in OmegaConf.load(path).keys()}
    declared_keys = set()
    for name, script in ALL.items():
        for group, declaration in script.groups.items():
            for path in (ROOT / "config" / group).glob("*.yaml"):
                try:
                    schema = declaration(OmegaConf.load(path))
                except UserError:
                    continue
                declared_keys |= {f"{group}.{k}" for k in declared(schema)}
    assert sorted(declared_keys - keys) == []


@pytest.mark.parametrize("script, key, close", [("maxl_train", "epoch", "epochs"), ("learn_labeler", "k", "K"),
                                                ("meta_eval", "val_n_shot", "val_n_shots")])
def test_an_appended_key_the_script_does_not_read_is_refused(script, key, close):
    assert error_of(script, f"+{key}=3") == f"{key} is not a setting of {script}.py: did you mean {close}?"
    assert error_of(script, "+zzz=1") == f"zzz is not a setting of {script}.py: see python {script}.py --help"


# ---- checks against the data ---------------------------------------------------------------------------------

@pytest.mark.parametrize("script, overrides, split, message", [
    ("learn_meta_repr", ["dataset.generate.classes.val=4"], "val",
     r"val_n_ways=5 but the val split of synthetic_fs has only 4 classes: lower val_n_ways to at most 4"),
    ("learn_meta_repr", ["val_n_shots=[5,16]"], "val",
     r"val_n_shots=16 with n_queries=15 takes 31 images per class but class \d+ of the val split of synthetic_fs "
     r"has 30: lower val_n_shots or n_queries"),
    ("sup_baseline", ["n_ways=6"], "val",
     r"n_ways=6 but the val split of synthetic_fs has only 5 classes: lower n_ways to at most 5"),
    ("meta_eval", ["n_ways=6"], "test",
     r"n_ways=6 but the test split of synthetic_fs has only 5 classes: lower n_ways to at most 5"),
])
def test_an_evaluation_the_split_cannot_hold_fails_when_the_evaluator_is_built(script, overrides, split, message):
    cfg = composed(script, ["dataset=synthetic_fs", *overrides])
    validate(cfg, ALL[script])  # the config alone is fine: only the data says otherwise
    n_ways = cfg.val_n_ways if "val_n_ways" in cfg else cfg.n_ways
    with pytest.raises(UserError, match=f"^{message}$"):
        FewShotEvaluator(cfg, None, split, n_ways, list(cfg.val_n_shots), 1.0)


def test_an_evaluation_the_split_holds_builds():
    cfg = composed("learn_meta_repr", ["dataset=synthetic_fs", "val_n_shots=[15]"])  # 15 + 15 = 30 images
    evaluator = FewShotEvaluator(cfg, None, "val", 5, [15], 1.0)
    assert [sub.name for sub in evaluator.subsets] == ["synthetic_fs"]


# ---- the environment -----------------------------------------------------------------------------------------

def test_a_workspace_that_is_a_file_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "ws"
    path.write_text("")
    monkeypatch.setenv("WORKSPACE", str(path))
    fix = "set WORKSPACE to a directory you can write to"
    assert error_of("learn_meta_repr") == f"WORKSPACE={path} is a file, not a directory: {fix}"
    assert error_of("meta_eval") == f"WORKSPACE={path} is a file, not a directory: {fix}"
    monkeypatch.setenv("WORKSPACE", str(path / "below"))
    assert error_of("maxl_train") == f"WORKSPACE={path / 'below'} is inside {path}, which is a file, not a " \
                                     f"directory: {fix}"
    given = tmp_path / "given"
    given.write_text("")
    assert error_of("maxl_train", f"workspace={given}") == \
        f"workspace={given} is a file, not a directory: give workspace= a directory you can write to"


def test_an_unwritable_workspace_is_refused_for_the_scripts_that_write_there(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setenv("WORKSPACE", str(locked))
    # os.access rather than permissions: the tests may run as root, which may write anywhere
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    assert error_of("sup_baseline") == f"WORKSPACE={locked} is not writable: set WORKSPACE to a directory you can " \
                                       f"write to"
    assert error_of("maxl_train", f"workspace={locked / 'new'}") == \
        f"workspace={locked / 'new'} cannot be created: {locked} is not writable: give workspace= a directory you " \
        f"can write to"
    assert validate(composed("meta_eval"), ALL["meta_eval"]) is None  # it only reads checkpoints from there
    check_workspace(tmp_path)  # a writable one passes


@pytest.mark.parametrize("launcher", ["slurm", "submitit_slurm"])
def test_a_slurm_sweep_without_sbatch_is_refused(launcher, tmp_path, monkeypatch):
    hydra_cfg = composed("maxl_train", [f"hydra/launcher={launcher}"]).hydra
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError) as caught:
        check_launcher(hydra_cfg)
    assert str(caught.value) == f"hydra/launcher={launcher} needs SLURM's sbatch on PATH: run on a cluster login " \
                                f"node, or drop hydra/launcher=... to run locally"
    sbatch = tmp_path / "sbatch"
    sbatch.write_text("#!/bin/sh\n")
    sbatch.chmod(0o755)
    check_launcher(hydra_cfg)  # on a login node


def test_the_local_launcher_needs_no_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    check_launcher(composed("maxl_train").hydra)
    check_launcher(composed("maxl_train", ["hydra/launcher=submitit_local"]).hydra)


# ---- through the real scripts -----------------------------------------------------------------------------------

def test_a_dataset_without_its_mandatory_keys_is_one_line(tmp_path, workspace):
    result = run_in_process("maxl_train.py", "dataset=hier_file", cwd=tmp_path, workspace=workspace)
    missing = _missing_keys("hier_file")[0]
    assert one_line_error(result) == f"error: dataset.{missing} is required for dataset=hier_file: give " \
                                     f"dataset.{missing}=..."
    assert not (tmp_path / "logs").exists() and list(workspace.iterdir()) == []  # nothing written


def test_a_slurm_sweep_without_sbatch_stops_with_one_line(tmp_path, workspace, monkeypatch):
    without_sbatch = [p for p in os.environ["PATH"].split(os.pathsep) if not os.path.isfile(os.path.join(p, "sbatch"))]
    monkeypatch.setenv("PATH", os.pathsep.join(without_sbatch))
    result = run_in_process("maxl_train.py", "-m", "hydra/launcher=slurm", "epochs=1,2", cwd=tmp_path,
                            workspace=workspace)
    assert one_line_error(result) == "error: hydra/launcher=slurm needs SLURM's sbatch on PATH: run on a cluster " \
                                     "login node, or drop hydra/launcher=... to run locally"


# ---- --help ------------------------------------------------------------------------------------------------------

def _groups(help_text: str) -> dict[str, list[str]]:
    section = help_text.split("== Config groups (group=option) ==\n", 1)[1].split("\n\n", 1)[0]
    return {group: options.split(", ") for group, options in
            (line.split(": ", 1) for line in section.splitlines())}


def rendered_help(script: str) -> str:
    """The app help as Hydra prints it for `--help` (its template, with the config groups it names)."""
    template = composed(script).hydra.help.template
    return string.Template(template).safe_substitute()


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_only_the_groups_the_script_takes(script):
    text = rendered_help(script)
    models = sorted(p.stem for p in (ROOT / "config" / "model").glob("*.yaml"))
    assert _groups(text) == {"dataset": list(dataset_names(VIEW[script])), "model": models}
    assert text.startswith(f"{script}.py: ") and f"python {script}.py " in text.split("== Examples ==")[1]
    keys = text.split("== Keys (key=value) ==\n", 1)[1].split("\n== ", 1)[0]
    named = [line.split()[0] for line in keys.splitlines() if line.startswith("  ")]
    assert sorted(named) == sorted(declared(ALL[script].settings)), "help lists every key once"


def test_help_through_the_script(tmp_path, workspace):
    result = run_in_process("learn_meta_repr.py", "--help", cwd=tmp_path, workspace=workspace)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("learn_meta_repr.py: MeLa step 1.")
    groups = _groups(result.stdout)
    assert groups["dataset"] == list(dataset_names("mela")) and "cifar100" not in groups["dataset"]
    assert "python learn_meta_repr.py dataset=miniImageNet" in result.stdout
    assert not (tmp_path / "logs").exists()


# ---- one key, one edit ---------------------------------------------------------------------------------------

def test_a_key_added_to_a_declaration_is_validated_documented_and_in_help(workspace, monkeypatch):
    """Adding a hyper-parameter is one edit: a field in the method's declaration (here a subclass stands for it)."""
    from dataclasses import dataclass, replace

    from engine.entry import compose, register
    from engine.settings import Integer, setting
    from methods.scripts import MaxlTrainSettings
    from tools import config_docs

    @dataclass
    class WithWarmup(MaxlTrainSettings):
        warmup_epochs: int = setting(0, Integer(0), "epochs of linear learning-rate warm-up")

    original = ALL["maxl_train"]
    script = replace(original, settings=WithWarmup)
    register(script)
    try:
        assert compose(script, []).warmup_epochs == 0
        assert compose(script, []).name == compose(original, []).name  # a new default renames no run
        assert compose(script, ["warmup_epochs=3"]).warmup_epochs == 3
        with pytest.raises(UserError) as caught:
            compose(script, ["warmup_epochs=-1"])
        assert str(caught.value) == "warmup_epochs=-1: warmup_epochs must be an integer >= 0"
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):  # as registered, with the new key
            template = hydra_compose("maxl_train", return_hydra_config=True).hydra.help.template
        assert "  warmup_epochs        an integer >= 0; epochs of linear learning-rate warm-up" in \
            string.Template(template).safe_substitute().splitlines()
        monkeypatch.setitem(config_docs.SCRIPTS, "maxl_train", script)
        assert "| `warmup_epochs` | maxl_train | an integer >= 0 | epochs of linear learning-rate warm-up |" in \
            config_docs.generated().splitlines()
    finally:
        monkeypatch.undo()  # config_docs.SCRIPTS is methods.scripts.SCRIPTS
        register(original)
    assert error_of("maxl_train", "+warmup_epochs=3").startswith("warmup_epochs is not a setting of maxl_train.py")
