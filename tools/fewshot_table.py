"""One table of several meta_eval runs: accuracy (%) with its 95% interval over tasks, one row per run.

    python -m tools.fewshot_table RUN_DIR... [--sub-datasets]

RUN_DIR: a meta_eval.py run directory (holding results.json). For means and intervals over seeds instead (several
runs of each setting): python -m tools.report.
"""
import argparse
import sys
from pathlib import Path

from methods.fewshot_eval import read_results, results_table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.fewshot_table", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="meta_eval run directories (holding results.json)")
    parser.add_argument("--sub-datasets", action="store_true", help="also a row per sub-dataset")
    args = parser.parse_args(argv)
    missing = [str(run) for run in args.runs if not (run / "results.json").is_file()]
    if missing:
        print(f"error: no results.json in {', '.join(missing)}: give meta_eval.py run directories", file=sys.stderr)
        sys.exit(1)
    print(results_table({run.name: read_results(run / "results.json") for run in args.runs}, args.sub_datasets))


if __name__ == "__main__":
    main()
