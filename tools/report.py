"""Results over seeds: finished runs grouped by their settings, with means and 95% t-intervals over the seeds.

    python -m tools.report PATH... [--metric KEY]... [--compare A B]... [--plot FILE] [--curve COLUMN]
                                    [--csv FILE] [--json FILE]

What a run's settings are, how runs are labelled and grouped, the default metrics, the statistics and the paired
comparisons: docs/experiments.md ("The report").
"""
import argparse
import csv
import glob
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.stats
import yaml
from omegaconf import OmegaConf

from engine.config import leaves, unnamed_settings
from engine.errors import ERROR_FILE, UserError
from engine.metrics import mean_ci95, read_metrics

CONFIDENCE = 0.95
SHOWN = ("script", "evaluated", "method")  # what a run is: in the label whenever they differ
MISSING = "-"  # the value of a setting a run does not have (runs of other scripts)
SUMMARY_SUFFIXES = ("_last5_mean", "_best", "_last")  # summary keys that summarise a metrics.csv column
STATS = ("mean", "ci95", "low", "high", "n")  # a metric's columns in --csv


def show(value) -> str:
    """A setting's value as printed and as matched by --compare (YAML-like: null, true, [3, 10])."""
    return value if isinstance(value, str) else json.dumps(value)


def identity(config: dict, seed, prefix: str = "") -> dict[str, str]:
    """The settings the engine hashes into a run's name, as shown, with `_s<seed>` for the replicate's seed in
    values that name a run of that seed (`pretrained_model=..._s1`), so the chains over seeds form one group."""
    hashed = leaves(OmegaConf.create(config), skip=unnamed_settings(), strict=False)
    settings = {f"{prefix}{key}": show(value) for key, value in hashed.items()}
    if not isinstance(seed, int) or isinstance(seed, bool):
        return settings
    return {key: re.sub(rf"_s{seed}(?![0-9])", "_s<seed>", value) for key, value in settings.items()}


def natural_key(path: Path):
    """Job 10 after job 9: digits compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


@dataclass
class Run:
    path: Path
    settings: dict[str, str]          # what tells it apart (`identity`), `script` (and `evaluated...`)
    seed: int | None
    scalars: dict[str, float]         # summary.json and results.json values
    defaults: list[str]               # its headline metric(s)
    finished_at: float                # when its results were written
    notes: list[str]

    @cached_property
    def history(self) -> list[dict]:
        csv_path = self.path / "metrics.csv"
        return read_metrics(csv_path) if csv_path.is_file() else []

    def value(self, key: str) -> float | None:
        """`key` from summary/results, else the last finite value of that metrics.csv column."""
        if key in self.scalars:
            return self.scalars[key]
        return next((row[key] for row in reversed(self.history) if key in row and math.isfinite(row[key])), None)

    def curve(self, column: str) -> dict[int, float]:
        return {int(row["epoch"]): row[column] for row in self.history
                if column in row and math.isfinite(row[column])}


# ---- finding and reading runs -----------------------------------------------------------------------------

def expand(paths: list[str]) -> list[Path]:
    found = []
    for text in paths:
        if Path(text).exists():
            found.append(Path(text))
            continue
        matches = sorted(glob.glob(text, recursive=True)) if re.search(r"[*?\[]", text) else []
        if not matches:
            raise UserError(f"{text}: no such file or folder: give run directories, multirun folders or globs")
        found += [Path(match) for match in matches]
    return found


def run_directories(paths: list[Path]) -> list[Path]:
    """Folders holding config.yaml or error.txt, at any depth below `paths` (not inside a run's own folders)."""
    runs = []

    def visit(folder: Path):
        if (folder / "config.yaml").is_file() or (folder / ERROR_FILE).is_file():
            runs.append(folder)
            return
        for child in sorted(folder.iterdir(), key=natural_key):
            if child.is_dir() and not child.name.startswith("."):
                visit(child)

    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path} is not a folder: give run directories, multirun folders or globs")
        visit(path)
    unique = {path.resolve(): path for path in runs}
    return sorted(unique.values(), key=natural_key)


def script_of(run_dir: Path) -> str | None:
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        return yaml.safe_load(hydra_file.read_text())["hydra"]["job"]["name"]
    logs = sorted(run_dir.glob("*.log"))
    return logs[0].stem if logs else None


def evaluated_checkpoint(results: dict) -> tuple[dict, list[str]]:
    """The config of the checkpoint a meta_eval run scored (empty, with a note, when it cannot be read here)."""
    import torch  # only meta_eval results need it

    path = Path(results.get("checkpoint", ""))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return yaml.safe_load(payload["config"]), []
    except Exception:  # moved, deleted, or not a metalabel checkpoint: group by meta_eval's own settings
        return {}, [f"checkpoint {path} not readable: grouped by meta_eval's settings and seed only"]


def results_scalars(results: dict) -> dict[str, float]:
    """meta_eval's results.json as `<split>/<k>shot[/<sub>]` (overall, or per sub-dataset) and its `_ci95`."""
    split = results.get("split", "test")
    scalars = {}
    for shots, per_sub in sorted(results["results"].items(), key=lambda item: int(item[0])):
        for sub, stats in per_sub.items():
            key = f"{split}/{shots}shot" + ("" if sub == "overall" else f"/{sub}")
            scalars[key], scalars[f"{key}_ci95"] = stats["mean"], stats["ci95"]
    return scalars


def headline(written: dict, scalars: dict[str, float]) -> list[str]:
    """The default metrics of a run: the `headline` its summary.json / results.json names, else the legacy ones."""
    named = written.get("headline")
    if isinstance(named, str):
        return [named]
    if isinstance(named, list) and named:
        return [str(key) for key in named]
    return legacy_headline(scalars)


def legacy_headline(scalars: dict[str, float]) -> list[str]:
    """For runs written before results named their `headline`: MAXL's test/acc_last5_mean, else every
    `<split>/<k>shot` (meta_eval's overall accuracies, MeLa training steps' last validation)."""
    if "test/acc_last5_mean" in scalars:
        return ["test/acc_last5_mean"]
    return [key for key in scalars if re.fullmatch(r"[^/]+/\d+shot", key)]


def read_run(run_dir: Path, finished: Path) -> Run:
    """The run whose results (meta_eval's results.json, else summary.json) are `finished`."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    settings = {"script": show(script_of(run_dir))}
    seed, notes = config.get("seed"), []
    written = json.loads(finished.read_text())
    if finished.name == "results.json":
        scalars = results_scalars(written)
        trained, notes = evaluated_checkpoint(written)
        seed = trained.get("seed", seed)
        settings["evaluated"] = show(written.get("script"))
        settings |= identity(config, seed) | identity(trained, seed, "evaluated.")
    else:
        scalars = {key: float(value) for key, value in written.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        settings |= identity(config, seed)
    return Run(run_dir, settings, seed, scalars, headline(written, scalars), finished.stat().st_mtime, notes)


def collect(paths: list[str]) -> tuple[list[Run], list[str]]:
    """The finished runs under `paths`, and one note per run left out. A folder with error.txt is a failed job,
    unless results written after it show that a later attempt in the same folder succeeded."""
    runs, notes = [], []
    for run_dir in run_directories(expand(paths)):
        error = run_dir / ERROR_FILE
        results = [f for f in (run_dir / "results.json", run_dir / "summary.json") if f.is_file()]
        if error.is_file() and not (results and results[0].stat().st_mtime > error.stat().st_mtime):
            reason = next((line for line in error.read_text().splitlines() if line.startswith("error:")), "error:")
            notes.append(f"failed job left out: {run_dir} ({reason.removeprefix('error:').strip()})")
        elif not results:
            notes.append(f"unfinished run left out (no summary.json or results.json): {run_dir}")
        else:
            try:
                runs.append(read_run(run_dir, results[0]))
            except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:  # a half-written file
                notes.append(f"unreadable run left out: {run_dir} ({type(exc).__name__}: {exc})")
    return runs, notes


# ---- labels and groups ------------------------------------------------------------------------------------

def differing_keys(runs: list[Run]) -> list[str]:
    """The settings whose values differ between the runs (seeds aside: they are not settings)."""
    keys = list(dict.fromkeys(key for run in runs for key in run.settings))
    return [key for key in keys if len({run.settings.get(key, MISSING) for run in runs}) > 1]


def label_keys(runs: list[Run]) -> list[str]:
    """The differing settings that label the runs: `SHOWN` ones always, any other only when the rest do not
    already separate the same groups. Dropped first: keys inside a group (`dataset.primary_level`), then top-level
    keys, then a choice's name (`dataset.name`); later keys before earlier ones."""
    differing = differing_keys(runs)

    def groups(using):
        return len({tuple(run.settings.get(key, MISSING) for key in using) for run in runs})

    def keep_first(key):
        kind = 0 if key.endswith(".name") else 1 if "." not in key else 2
        return kind, differing.index(key)

    kept = list(differing)
    for key in sorted((k for k in differing if k not in SHOWN), key=keep_first, reverse=True):
        rest = [k for k in kept if k != key]
        if groups(rest) == groups(kept):
            kept = rest
    return kept


@dataclass
class Group:
    index: int
    settings: dict[str, str]
    runs: list[Run]

    @property
    def label(self) -> str:
        return " ".join(f"{key}={value}" for key, value in self.settings.items()) or "all runs"

    def setting(self, key: str) -> str:
        return self.runs[0].settings.get(key, MISSING)

    @property
    def seeds(self) -> list:
        return [run.seed for run in self.runs]

    def values(self, metric: str) -> list[tuple]:
        """(seed, value) of each run that has the metric, in the group's order."""
        return [(run.seed, v) for run in self.runs if (v := run.value(metric)) is not None]

    def by_seed(self, metric: str) -> dict[object, list[float]]:
        """seed -> the values of its runs that have the metric (several when a seed has several runs)."""
        grouped: dict = {}
        for seed, value in self.values(metric):
            grouped.setdefault(seed, []).append(value)
        return grouped


def seed_order(seed):
    return seed is None, seed


def make_groups(runs: list[Run], keys: list[str]) -> tuple[list[Group], list[str]]:
    """Runs with equal labels, groups in the order they were found, runs by seed (then by when they finished).
    Every run is kept: two run folders with the same settings and seed are noted, not merged."""
    by_label: dict[tuple, list[Run]] = {}
    for run in runs:
        by_label.setdefault(tuple(run.settings.get(key, MISSING) for key in keys), []).append(run)
    groups, notes = [], []
    for index, (label, members) in enumerate(by_label.items(), 1):
        members = sorted(members, key=lambda r: (seed_order(r.seed), r.finished_at))
        for seed in dict.fromkeys(r.seed for r in members):
            same = [r for r in members if r.seed == seed]
            if len(same) > 1:
                notes.append(f"same settings and seed {show(seed)} in {len(same)} run folders, all kept: "
                             + ", ".join(str(r.path) for r in same))
        groups.append(Group(index, dict(zip(keys, label)), members))
    return groups, notes


# ---- statistics -------------------------------------------------------------------------------------------

def t_interval(values) -> dict:
    """n, mean and the 95% t-interval of the mean (half-width `ci95`, bounds `low`, `high`; NaN for n < 2)."""
    values = list(values)
    mean, half = mean_ci95(values, CONFIDENCE)
    return {"n": len(values), "mean": mean, "ci95": half, "low": mean - half, "high": mean + half}


def paired_difference(a: dict, b: dict) -> dict:
    """A - B over the seeds both have: the t-interval of the mean difference and the paired t-test's p-value."""
    seeds = sorted(set(a) & set(b), key=seed_order)
    first, second = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    stats = t_interval(first - second)
    with warnings.catch_warnings():  # equal differences: the test is undefined (NaN)
        warnings.simplefilter("ignore")
        p = float(scipy.stats.ttest_rel(first, second).pvalue) if len(seeds) > 1 else math.nan
    return {**stats, "p": p, "seeds": seeds}


# ---- --compare --------------------------------------------------------------------------------------------

def select(groups: list[Group], selector: str, keys: list[str]) -> tuple[list[Group], set[str]]:
    """The groups a --compare side names: a group number, or key=value[,key=value...] of settings that differ
    between the runs (`keys`; within a group they are equal)."""
    if selector.isdigit():
        chosen = [g for g in groups if g.index == int(selector)]
        if not chosen:
            raise UserError(f"--compare {selector}: no group {selector}; groups are numbered 1 to {len(groups)}")
        return chosen, set()
    wanted = {}
    for part in selector.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise UserError(f"--compare {selector}: give a group number or key=value, e.g. method=maxl")
        if key not in keys:
            raise UserError(f"--compare {selector}: {key} does not tell these runs apart; their settings: "
                            f"{', '.join(keys) or 'none (one group)'}")
        wanted[key] = value
    chosen = [g for g in groups if all(g.setting(k) == v for k, v in wanted.items())]
    if not chosen:
        raise UserError(f"--compare {selector}: no group has these settings; values: "
                        + "; ".join(f"{k}: {', '.join(sorted({g.setting(k) for g in groups}))}" for k in wanted))
    return chosen, set(wanted)


def pairs(groups: list[Group], a: str, b: str, keys: list[str], labels: list[str]) -> list[tuple[Group, Group]]:
    side_a, named_a = select(groups, a, keys)
    side_b, named_b = select(groups, b, keys)
    others = [k for k in labels if k not in named_a | named_b]
    if len(side_b) == 1:
        matched = [(g, side_b[0]) for g in side_a]
    elif len(side_a) == 1:
        matched = [(side_a[0], g) for g in side_b]
    else:
        matched = [(ga, gb) for ga in side_a for gb in side_b if all(ga.settings[k] == gb.settings[k] for k in others)]
    matched = [(ga, gb) for ga, gb in matched if ga is not gb]
    if not matched:
        raise UserError(f"--compare {a} {b}: no pair of distinct groups that agree on the other settings "
                        f"({', '.join(others)}); give group numbers instead")
    return matched


def compare(groups, comparisons, metrics, keys, labels) -> list[dict]:
    found = []
    for a, b in comparisons:
        for ga, gb in pairs(groups, a, b, keys, labels):
            for metric in metrics:
                sides = ga.by_seed(metric), gb.by_seed(metric)
                repeated = sorted({s for side in sides for s, v in side.items() if len(v) > 1}, key=seed_order)
                va, vb = ({s: v[0] for s, v in side.items() if s not in repeated} for side in sides)
                if va and vb:
                    found.append({"a": ga.index, "b": gb.index, "a_label": ga.label, "b_label": gb.label,
                                  "metric": metric, **paired_difference(va, vb),
                                  "unpaired": sorted(set(va) ^ set(vb), key=seed_order), "repeated": repeated})
    return found


# ---- output -----------------------------------------------------------------------------------------------

def cell(stats: dict | None) -> str:
    if stats is None:
        return MISSING
    if stats["n"] < 2:
        return f"{stats['mean']:.4f} (n=1)"
    return f"{stats['mean']:.4f} +- {stats['ci95']:.4f}"


def table(groups: list[Group], keys: list[str], metrics: list[str], stats: dict) -> str:
    header = ["#", *(keys or ["runs"]), "n", "seeds", *metrics]
    rows = [[str(g.index), *(g.settings.values() or ["all"]), str(len(g.runs)),
             ",".join(show(s) for s in g.seeds), *(cell(stats[g.index].get(m)) for m in metrics)] for g in groups]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def comparison_line(c: dict) -> str:
    pair = f"{c['metric']}: #{c['a']} ({c['a_label']}) - #{c['b']} ({c['b_label']})"
    head = f"{pair} = {c['mean']:+.4f}"
    seeds = ",".join(show(s) for s in c["seeds"])
    if c["n"] == 0:
        text = f"{pair}: no seed has one run in each group, nothing to compare"
    elif c["n"] < 2:
        text = f"{head}, n={c['n']} seed ({seeds}): no interval or p-value with one pair"
    else:
        text = (f"{head}, 95% interval [{c['low']:+.4f}, {c['high']:+.4f}], paired t-test p={c['p']:.3g}, "
                f"n={c['n']} seeds ({seeds})")
    if c["unpaired"]:
        text += f"; seeds in one group only, left out: {','.join(show(s) for s in c['unpaired'])}"
    if c["repeated"]:
        text += f"; seeds with several runs in a group, left out: {','.join(show(s) for s in c['repeated'])}"
    return text


def plain(value):
    """JSON without NaN (null instead)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def write_csv(path: Path, groups, keys, metrics, stats) -> None:
    columns = ["group", "label", *keys, "n", "seeds"]
    columns += [f"{m} {part}" for m in metrics for part in STATS]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for g in groups:
            row = [g.index, g.label, *g.settings.values(), len(g.runs), " ".join(show(s) for s in g.seeds)]
            for m in metrics:
                s = stats[g.index].get(m)
                row += [s[part] for part in STATS] if s else [""] * len(STATS)
            writer.writerow(row)


def write_json(path: Path, groups, keys, metrics, stats, comparisons, notes) -> None:
    document = {
        "metrics": metrics, "settings": keys, "confidence": CONFIDENCE,
        "groups": [{"group": g.index, "label": g.label, "settings": g.settings, "n": len(g.runs), "seeds": g.seeds,
                    "runs": [str(r.path) for r in g.runs],
                    "metrics": {m: {**s, "values": {seed: v[0] if len(v) == 1 else v  # a list: a seed's runs
                                                    for seed, v in g.by_seed(m).items()}}
                                for m, s in stats[g.index].items()}}
                   for g in groups],
        "comparisons": comparisons, "notes": notes,
    }
    path.write_text(json.dumps(plain(document), indent=2))


def curve_column(runs: list[Run], metrics: list[str], given: str | None) -> str:
    """The metrics.csv column to plot: --curve, else the first metric's own column (or the column a summary key
    such as test/acc_last5_mean summarises)."""
    columns = {key for run in runs for row in run.history for key in row} - {"epoch"}
    if given:
        if given not in columns:
            raise UserError(f"--curve {given}: no run's metrics.csv has this column; columns: "
                            f"{', '.join(sorted(columns)) or 'none (no metrics.csv)'}")
        return given
    for metric in metrics:
        for candidate in [metric] + [metric.removesuffix(s) for s in SUMMARY_SUFFIXES if metric.endswith(s)]:
            if candidate in columns:
                return candidate
    raise UserError(f"--plot: no metrics.csv column matches {', '.join(metrics)}: choose one with --curve "
                    f"COLUMN; columns: {', '.join(sorted(columns)) or 'none (these runs have no metrics.csv)'}")


def mean_curves(groups: list[Group], column: str) -> dict[int, tuple[list, np.ndarray, np.ndarray]]:
    """Per group: the epochs, the mean over its runs at each epoch and the 95% t-interval half-width (NaN: n=1)."""
    curves = {}
    for g in groups:
        runs = [run.curve(column) for run in g.runs]
        epochs = sorted({epoch for curve in runs for epoch in curve})
        if epochs:
            per_epoch = [t_interval([curve[e] for curve in runs if e in curve]) for e in epochs]
            curves[g.index] = (epochs, np.array([s["mean"] for s in per_epoch]),
                               np.array([s["ci95"] for s in per_epoch]))
    return curves


def figure(groups: list[Group], column: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {g.index: f"#{g.index} {g.label} (n={len(g.runs)})" for g in groups}
    curves = mean_curves(groups, column)
    # an accuracy's band (test/acc, val/5shot) stays inside [0, 1] (a t-interval over few seeds can reach past it)
    name = column.rsplit("/", 1)[-1]
    bounded = "acc" in name or name.endswith("shot")
    bounded = bounded and all(((m >= 0) & (m <= 1)).all() for _, m, _ in curves.values())
    for index, (epochs, means, half) in curves.items():
        shown = [e + 1 for e in epochs]  # metrics.csv counts epochs from 0, the log and the figures from 1
        line, = ax.plot(shown, means, marker="." if len(epochs) < 30 else None, label=labels[index])
        low, high = means - half, means + half
        if bounded:
            low, high = np.clip(low, 0, 1), np.clip(high, 0, 1)
        ax.fill_between(shown, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(column)
    ax.set_title(f"{column}: mean over seeds, 95% t-interval", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


# ---- command line -----------------------------------------------------------------------------------------

def output_path(option: str, given: str) -> Path:
    """An output file: not empty, not a folder, not at the file system's top (a study folder's name that came out
    empty turns `$dir/table.csv` into `/table.csv`)."""
    path = Path(given)
    if not given.strip() or given.endswith("/") or path.is_dir():
        raise UserError(f"--{option} {given!r}: give a file name, e.g. --{option} study/table.{option}")
    if path.resolve().parent == Path(path.resolve().anchor):
        raise UserError(f"--{option} {given}: refusing to write at the top of the file system; give a file inside "
                        f"the study's folder")
    return path


def report(args) -> None:
    runs, notes = collect(args.paths)
    if not runs:
        raise UserError(f"no finished runs under {' '.join(args.paths)} ({len(notes)} left out): give run "
                        f"directories or multirun folders of finished runs")
    metrics = args.metric or list(dict.fromkeys(m for run in runs for m in run.defaults))
    if not metrics:
        raise UserError("these runs have no default metric: choose one with --metric KEY, e.g. "
                        + ", ".join(sorted({k for run in runs for k in run.scalars})[:8]))
    for metric in metrics:
        if all(run.value(metric) is None for run in runs):
            known = sorted({k for run in runs for k in run.scalars} | {k for run in runs[:1] for row in run.history
                                                                         for k in row})
            raise UserError(f"--metric {metric}: no run has it in summary.json, results.json or metrics.csv; "
                            f"known: {', '.join(known[:12])}{' ...' if len(known) > 12 else ''}")
    keys = label_keys(runs)
    groups, duplicates = make_groups(runs, keys)
    notes += duplicates + sorted({note for run in runs for note in run.notes})
    stats = {g.index: {m: t_interval(value for _, value in v) for m in metrics if (v := g.values(m))}
             for g in groups}
    comparisons = compare(groups, args.compare or [], metrics, differing_keys(runs), keys)
    column = curve_column(runs, metrics, args.curve) if args.plot else None

    for note in notes:
        print(f"note: {note}")
    shown = sum(len(g.runs) for g in groups)
    print(f"{shown} runs in {len(groups)} groups; mean over seeds +- half-width of the 95% t-interval")
    print(table(groups, keys, metrics, stats))
    if comparisons:
        print("\npaired by seed (A - B):")
        print("\n".join(comparison_line(c) for c in comparisons))
    for path in (args.csv, args.json, args.plot):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
    if args.csv:
        write_csv(args.csv, groups, keys, metrics, stats)
        print(f"csv: {args.csv}")
    if args.json:
        write_json(args.json, groups, keys, metrics, stats, comparisons, notes)
        print(f"json: {args.json}")
    if args.plot:
        import matplotlib.pyplot as plt

        fig = figure(groups, column)
        fig.savefig(args.plot, dpi=120)
        plt.close(fig)
        print(f"plot: {args.plot} ({column})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__.splitlines()[0],
                                     epilog="Statistics and labels: see docs/experiments.md.")
    parser.add_argument("paths", nargs="+", help="run directories, folders holding them, or quoted globs")
    parser.add_argument("--metric", action="append", help="a summary/results key or metrics.csv column "
                        "(repeatable; default: each run's headline metrics)")
    parser.add_argument("--compare", nargs=2, action="append", metavar=("A", "B"),
                        help="paired comparison over seeds: group numbers or key=value settings (repeatable)")
    parser.add_argument("--plot", help="figure of the mean curves per group over epochs")
    parser.add_argument("--curve", help="the metrics.csv column plotted (default: the first metric's column)")
    parser.add_argument("--csv", help="write the table as CSV")
    parser.add_argument("--json", help="write groups, runs, values, intervals and comparisons as JSON")
    args = parser.parse_args(argv)
    try:
        for option in ("plot", "csv", "json"):
            if getattr(args, option) is not None:
                setattr(args, option, output_path(option, getattr(args, option)))
        report(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
