"""Misspelled keys and group options are one `error:` line with the closest valid names, before Hydra starts
(engine.entry.check_command_line), and the tools built on the scripts' configs say the same; a CIFAR download
without a network is one line too."""
import subprocess
import sys
import urllib.error

import pytest
from conftest import ROOT, one_line_error, run_script

from engine.entry import check_command_line
from engine.errors import UserError
from methods.scripts import SCRIPTS
from tools import download, pipeline


@pytest.mark.parametrize("script, argv, message", [
    ("maxl_train", ["epoch=3"], "epoch=3: epoch is not a setting of maxl_train.py: did you mean epochs?"),
    ("maxl_train", ["dataset=digit"], "dataset=digit: no such dataset option for maxl_train.py: did you mean digits? "
                                      "(dataset options: cifar10, cifar100, digits, hier_file, synthetic_hier)"),
    ("maxl_train", ["model=resnet50"], "model=resnet50: no such model option for maxl_train.py: did you mean "
                                       "resnet18? (model options: conv4, resnet12, resnet18, vgg16)"),
    ("maxl_train", ["-m", "seed=0,1", "dataset=digits,digit"], "dataset=digit: no such dataset option"),
    ("learn_labeler", ["dataset=minImageNet"], "dataset=minImageNet: no such dataset option for learn_labeler.py: "
                                               "did you mean miniImageNet?"),
    ("learn_labeler", ["lamda=0.1"], "lamda=0.1: lamda is not a setting of learn_labeler.py: did you mean lam?"),
])
def test_misspellings_are_one_line_with_the_closest_valid_name(script, argv, message):
    with pytest.raises(UserError) as err:
        check_command_line(SCRIPTS[script], argv)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    if "dataset options" in message:
        assert "miniImageNet" not in str(err.value)  # only the datasets the script takes


@pytest.mark.parametrize("argv", [
    ["--help"], ["epoch=3", "--help"], ["--cfg", "job", "--resolve", "seed=2"],
    ["-m", "method=single,maxl", "seed=0,1"],
    ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], ["+experiment=maxl_psi", "experiment/psi=psi2"],
    ["+extra=1"], ["dataset=digits", "dataset.primary_level=2", "model.width_mult=0.5"], ["model=glob(*)"],
])
def test_what_hydra_takes_passes_untouched(argv):
    check_command_line(SCRIPTS["maxl_train"], argv)


def test_a_real_process_exits_1_with_the_one_line(tmp_path, workspace):
    line = one_line_error(run_script("maxl_train.py", "epoch=3", cwd=tmp_path, workspace=workspace))
    assert line == "error: epoch=3: epoch is not a setting of maxl_train.py: did you mean epochs? (python " \
                   "maxl_train.py --help lists the keys)"
    assert not (tmp_path / "logs").exists()


def test_the_pipeline_names_a_misspelled_dataset_in_one_line(workspace, capsys):
    with pytest.raises(SystemExit) as stop:
        pipeline.main(["--dataset", "minImageNet"])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1
    assert err.startswith("error: dataset=minImageNet: no such dataset option for learn_meta_repr.py: did you mean "
                          "miniImageNet?")


def test_a_cifar_download_without_a_network_is_one_line(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.utils as utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(utils, "download_url", offline)
    assert download.main(["--data-dir", str(tmp_path), "cifar100"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: CIFAR100 could not be downloaded from https://")
    assert "Name or service not known" in err and "cifar-100-python.tar.gz" in err


def test_make_download_cifar_without_a_network_is_one_line(tmp_path):
    """The real thing where there is no network (this machine): a process, one line, exit status 1."""
    done = subprocess.run([sys.executable, "-m", "tools.download", "--data-dir", str(tmp_path), "cifar10"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    if done.returncode == 0:
        pytest.skip("a network is reachable here")
    assert done.returncode == 1 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_no_config_sets_the_run_mode():
    """The in-process runs (conftest.run_in_process) skip Hydra's composition that only reads `hydra.mode`: right
    while no config sets it (None: the command line's -m decides)."""
    from hydra import compose, initialize_config_dir

    from engine.config import CONFIG_DIR
    from engine.entry import register

    for script in SCRIPTS.values():
        register(script)
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            assert compose(script.name, return_hydra_config=True).hydra.mode is None, script.name
