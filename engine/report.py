"""Compare finished runs: a table of their summaries and one plot of a metric's curves.

    python -m engine.report RUN_DIR [RUN_DIR ...] [--metric test/acc] [--plot out.png]

A run directory is the one a script printed ("run directory: ..."), holding metrics.csv and summary.json.
"""
import argparse
import json
import sys
from pathlib import Path

from engine.metrics import read_metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--metric", default="test/acc", help="metric to tabulate and plot")
    parser.add_argument("--plot", type=Path, help="write the metric's curves of every run to this PNG")
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        if not (run / "metrics.csv").is_file():
            sys.exit(f"error: {run} has no metrics.csv: give the run directory a script printed")
        history = read_metrics(run / "metrics.csv")
        values = [row[args.metric] for row in history if args.metric in row]
        if not values:
            sys.exit(f"error: {run}/metrics.csv has no column {args.metric}")
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        rows.append((run, history, values, summary))
    width = max(len(run.name) for run, *_ in rows)
    print(f"{'run':<{width}}  epochs  {args.metric + ' last':>16}  {'best':>8}  {'mean last 5':>11}")
    for run, history, values, _ in rows:
        last5 = values[-5:]
        print(f"{run.name:<{width}}  {len(history):>6}  {values[-1]:>16.4f}  {max(values):>8.4f}  "
              f"{sum(last5) / len(last5):>11.4f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for run, history, _, _ in rows:
            points = [(row["epoch"], row[args.metric]) for row in history if args.metric in row]
            ax.plot(*zip(*points), marker=".", label=run.name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(args.metric)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=100)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
