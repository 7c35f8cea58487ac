"""The Makefile's study recipes (maxl_hierarchies, maxl_psi, mela_study, mela_cifar, pipeline), with their variables read from
the environment, never spliced into shell text:

    ARGS='key=value ...' [SEEDS=0,1] [STUDY_DIR=DIR] [NAME=...] [DATASET=...] [DATASETS='...'] [MODELS='...']
    [CIFAR_DATASETS='cifar_fs fc100']
    python -m tools.study maxl_hierarchies | maxl_psi | mela_study | mela_cifar | pipeline

`make` exports the variables given on its command line, so `make maxl_psi ARGS="..."` hands ARGS over as it was
typed: spaces, newlines (a value written over several lines) and quotes split into overrides as a shell would
(`shlex`), and the runs, tables and figures go into the study's folder whatever ARGS holds. A bad value is one
`error:` line and exit status 1 before any run starts.
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
    text = " ".join(words(variable))
    return text or default


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


def report(*args: str) -> int:
    return run("-m", "tools.report", *args)


def maxl_study(target: str) -> int:
    study = folder("STUDY_DIR", f"logs/studies/{target}/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    seeds = value("SEEDS")
    failed = run(str(ROOT / "maxl_train.py"), "-m", f"+experiment={target}", f"hydra.sweep.dir={study}",
                 *([f"seed={seeds}"] if seeds else []), *words("ARGS"))
    done = report(str(study), *REPORTS[target], "--csv", str(study / "table.csv"), "--json",
                  str(study / "table.json"), "--plot", str(study / "test_accuracy.png"))
    return failed or done


def mela_study() -> int:
    name = value("NAME", "mela_study")
    study = folder("STUDY_DIR", f"logs/pipeline/{name}")
    failed = run("-m", "tools.pipeline", "--name", name, "--out", str(study),
                 "--dataset", *(words("DATASETS") or ["miniImageNet", "tieredImageNet"]),
                 "--model", *(words("MODELS") or ["resnet12", "resnet18"]),
                 "--seed", *(words("SEEDS") or ["0", "1", "2"]), "--", *words("ARGS"))
    return report_mela(study) or failed


def report_mela(study: Path) -> int:
    """The table over seeds of every step's meta_eval, with the labeler and fine_tune compared, and the figure."""
    done = report(f"{study}/*/eval", "--compare", "evaluated=learn_labeler", "evaluated=learn_meta_repr",
                  "--compare", "evaluated=fine_tune", "evaluated=sup_baseline", "--csv", str(study / "table.csv"),
                  "--json", str(study / "table.json"))
    return done or report(f"{study}/*/train", "--plot", str(study / "validation.png"))


def mela_cifar() -> int:
    """The MeLa study on CIFAR-FS and FC100: ResNet-12 with 2x2 DropBlock blocks (its last maps are 4x4 and 2x2 on
    32x32 input), the labeler's K from each dataset's config."""
    name = value("NAME", "mela_cifar")
    study = folder("STUDY_DIR", f"logs/pipeline/{name}")
    failed = 0
    for dataset in words("CIFAR_DATASETS") or ["cifar_fs", "fc100"]:
        failed = run("-m", "tools.pipeline", "--name", name, "--out", str(study), "--dataset", dataset,
                     "--model", "resnet12", "--seed", *(words("SEEDS") or ["0", "1", "2"]), "--",
                     "model.dropblock_size=2", *words("ARGS")) or failed
    return report_mela(study) or failed


def pipeline() -> int:
    name = words("NAME")
    return run("-m", "tools.pipeline", "--dataset", *(words("DATASET") or ["synthetic_fs"]),
               *(["--name", " ".join(name)] if name else []), "--", *words("ARGS"))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        studies = {"mela_study": mela_study, "mela_cifar": mela_cifar, "pipeline": pipeline}
        if len(argv) != 1 or argv[0] not in (*REPORTS, *studies):
            raise UserError(f"{' '.join(argv) or 'no study'}: give one of {', '.join([*REPORTS, *studies])}")
        target = argv[0]
        return maxl_study(target) if target in REPORTS else studies[target]()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
