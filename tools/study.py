"""The Makefile's study recipes, their variables read from the environment, never spliced into shell text:

    ARGS='key=value ...' [SEEDS=0,1] [STUDY_DIR=DIR] [NAME=...] [DATASET=...] [DATASETS='...'] [MODELS='...']
    [CIFAR_DATASETS='cifar_fs fc100']
    python -m tools.study maxl_hierarchies | maxl_psi | mela_study | mela_cifar | pipeline

`make` exports the variables given on its command line, so ARGS arrives as typed: it splits into overrides as a
shell would (`shlex`: quotes, newlines) and the outputs stay in the study's folder whatever it holds. A bad value
is one `error:` line and exit status 1 before any run starts.
"""
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from engine.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
REPORTS = {"maxl_hierarchies": ["--compare", "method=maxl", "method=single", "--compare", "method=maxl",
                                "method=human"],
           "maxl_psi": ["--compare", "method=maxl", "method=single"]}


def words(variable: str) -> list[str]:
    """The environment variable split as a shell splits words (quotes kept together, newlines are spaces)."""
    text = os.environ.get(variable, "")
    try:
        return shlex.split(text)
    except ValueError as err:
        raise UserError(f"{variable}={text!r}: {err} (close the quote)") from None


def value(variable: str, default: str | None = None) -> str | None:
    return " ".join(words(variable)) or default


def folder(variable: str, default: str) -> Path:
    """A study's folder: the variable when given, else `default`; never empty or the file system's top."""
    text = value(variable, default)
    path = Path(text)
    if path.resolve() == Path(path.resolve().anchor):
        raise UserError(f"{variable}={text}: a study's folder cannot be the top of the file system; give a folder "
                        f"of its own, e.g. {variable}=logs/studies/mine")
    return path


def run(*command: str) -> int:
    return subprocess.run([sys.executable, *command], cwd=os.getcwd()).returncode


def maxl_study(target: str) -> int:
    study = folder("STUDY_DIR", f"logs/studies/{target}/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    seeds = value("SEEDS")
    failed = run(str(ROOT / "maxl_train.py"), "-m", f"+experiment={target}", f"hydra.sweep.dir={study}",
                 *([f"seed={seeds}"] if seeds else []), *words("ARGS"))
    done = run("-m", "tools.report", str(study), *REPORTS[target], "--csv", str(study / "table.csv"),
               "--json", str(study / "table.json"), "--plot", str(study / "test_accuracy.png"))
    return failed or done


def mela(target: str) -> int:
    """mela_study: one pipeline over datasets x models x seeds. mela_cifar: one per CIFAR dataset, ResNet-12 with 2x2
    DropBlock blocks (its last maps are 4x4 and 2x2 on 32x32 input), the labeler's K from each dataset's config.
    Then the table over seeds of every step's meta_eval, with the labeler and fine_tune compared, and the figure."""
    name = value("NAME", target)
    study = folder("STUDY_DIR", f"logs/pipeline/{name}")
    if target == "mela_cifar":
        grids = [([dataset], ["resnet12"], ["model.dropblock_size=2"])
                 for dataset in words("CIFAR_DATASETS") or ["cifar_fs", "fc100"]]
    else:
        datasets = words("DATASETS") or ["miniImageNet", "tieredImageNet"]
        grids = [(datasets, words("MODELS") or ["resnet12", "resnet18"], [])]
    failed = 0
    for datasets, models, extra in grids:
        failed = run("-m", "tools.pipeline", "--name", name, "--out", str(study), "--dataset", *datasets,
                     "--model", *models, "--seed", *(words("SEEDS") or ["0", "1", "2"]), "--",
                     *extra, *words("ARGS")) or failed
    done = run("-m", "tools.report", f"{study}/*/eval", "--compare", "evaluated=learn_labeler",
               "evaluated=learn_meta_repr", "--compare", "evaluated=fine_tune", "evaluated=sup_baseline",
               "--csv", str(study / "table.csv"), "--json", str(study / "table.json"))
    return done or run("-m", "tools.report", f"{study}/*/train", "--plot", str(study / "validation.png")) or failed


def pipeline() -> int:
    name = value("NAME")
    return run("-m", "tools.pipeline", "--dataset", *(words("DATASET") or ["synthetic_fs"]),
               *(["--name", name] if name else []), "--", *words("ARGS"))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        studies = (*REPORTS, "mela_study", "mela_cifar", "pipeline")
        if len(argv) != 1 or argv[0] not in studies:
            raise UserError(f"{' '.join(argv) or 'no study'}: give one of {', '.join(studies)}")
        target = argv[0]
        if target in REPORTS:
            return maxl_study(target)
        return pipeline() if target == "pipeline" else mela(target)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
