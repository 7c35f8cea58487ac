"""Per-epoch metrics: a CSV, TensorBoard scalars and a PNG of the training curves."""
import csv
import math
from collections import defaultdict
from pathlib import Path

NOT_COMPARED = ("time_s",)  # wall-clock columns: differ between otherwise identical runs


class MetricsWriter:
    """Writes `metrics.csv`, TensorBoard events under `tensorboard/` and `curves.png` into `run_dir`."""

    def __init__(self, run_dir: Path, history: list[dict] | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.csv_path = self.run_dir / "metrics.csv"
        self.plot_path = self.run_dir / "curves.png"
        self.history: list[dict] = []
        # A resumed run rewrites metrics.csv with what the interrupted one recorded; TensorBoard gets those rows
        # only in a new folder: where events exist (the same run directory), only the new epochs are added, and
        # purge_step drops any later epoch the interrupted run had logged but not checkpointed.
        board = self.run_dir / "tensorboard"
        continued = bool(history) and any(board.glob("events.out.tfevents.*"))
        self.tensorboard = SummaryWriter(str(board), purge_step=history[-1]["epoch"] + 1 if continued else None)
        for row in history or []:
            self.write(row, tensorboard=not continued)

    def write(self, row: dict, tensorboard: bool = True) -> None:
        self.history.append(dict(row))
        columns = list(dict.fromkeys(key for r in self.history for key in r))
        with open(self.csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)
        if not tensorboard:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, row["epoch"])
        self.tensorboard.flush()

    def plot(self) -> Path | None:
        """One panel per metric (the part of the name after '/'; losses together, accuracies together), epochs
        counted from 1 on the x axis (metrics.csv counts them from 0). A baseline (`..._trivial`, `..._chance`) is
        drawn dashed in its metric's panel, an interval (`..._ci95`) as a band around its metric; a column that never
        changes gets no panel, and is named in the figure's footer instead."""
        fig = self.figure()
        if fig is None:
            return None
        import matplotlib.pyplot as plt

        fig.savefig(self.plot_path, dpi=100)
        plt.close(fig)
        return self.plot_path

    def figure(self):
        """curves.png's figure; None before the second epoch (one point per metric is no curve: metrics.csv and the
        log hold it)."""
        if len(self.history) < 2:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        series = {}
        for key in dict.fromkeys(k for r in self.history for k in r):
            if key in ("epoch",) + NOT_COMPARED:
                continue
            points = [(r["epoch"] + 1, r[key]) for r in self.history
                      if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
            if points:
                series[key] = points
        panels, baselines, bands = plot_parts(series)
        constants = {key: series[key][0][1] for keys in panels.values() for key in keys
                     if key not in baselines and key not in bands and len(series[key]) > 1
                     and len({value for _, value in series[key]}) == 1}
        panels = {kind: kept for kind, keys in panels.items() if (kept := [k for k in keys if k not in constants])}
        if not panels:
            return None
        columns = min(3, len(panels))
        rows = -(-len(panels) // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.5 * rows), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.axis("off")
        for ax, (kind, keys) in zip(axes.flat, panels.items()):
            for key in keys:
                epochs, values = zip(*series[key])
                line, = ax.plot(epochs, values, marker="." if len(epochs) < 30 else None, label=key)
                if key in bands:
                    half = dict(series[bands[key]])
                    low = [v - half.get(e, math.nan) for e, v in series[key]]
                    high = [v + half.get(e, math.nan) for e, v in series[key]]
                    ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, linewidth=0,
                                    label=f"{key} 95% interval")
                for baseline in baselines.get(key, []):
                    ax.plot(*zip(*series[baseline]), linestyle="--", color=line.get_color(), alpha=0.7,
                            label=baseline)
            ax.set_title(kind)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize="small")
            ax.grid(alpha=0.3)
        if constants:
            fig.text(0.01, 0.005, "constant: " + ", ".join(f"{k}={v:g}" for k, v in constants.items()),
                     fontsize="small", va="bottom")
        fig.tight_layout(rect=(0, 0.03 if constants else 0, 1, 1))
        return fig

    def write_hparams(self, cfg, summary: dict) -> None:
        """The run's settings and final numbers in TensorBoard's HPARAMS tab."""
        from engine.config import leaves

        settings = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                    for k, v in leaves(cfg, skip={"hydra"}).items()}
        finals = {f"final/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and k != "epochs"}
        self.tensorboard.add_hparams(settings, finals, run_name="hparams")

    def close(self) -> None:
        self.tensorboard.close()


BASELINE_SUFFIXES = ("_trivial", "_chance")
INTERVAL_SUFFIX = "_ci95"


def plot_parts(series: dict) -> tuple[dict, dict, dict]:
    """How curves.png draws the columns: (panel -> its metrics, metric -> its baselines, metric -> its interval's
    column). A baseline or interval whose metric is absent is drawn as a metric of its own."""
    baselines, bands, panels = defaultdict(list), {}, defaultdict(list)
    for key in series:
        base = next((key.removesuffix(s) for s in BASELINE_SUFFIXES if key.endswith(s)), None)
        if base in series:
            baselines[base].append(key)
            continue
        if key.endswith(INTERVAL_SUFFIX) and key.removesuffix(INTERVAL_SUFFIX) in series:
            bands[key.removesuffix(INTERVAL_SUFFIX)] = key
            continue
        kind = "loss" if "loss" in key else "acc" if "acc" in key else key.split("/")[-1]
        panels[kind].append(key)
    return dict(panels), dict(baselines), bands


def mean_ci95(values, confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the two-sided t-interval of the mean): sem * t.ppf((1 + confidence) / 2, n - 1), with
    sem = s / sqrt(n) and s the sample standard deviation (ddof=1). The half-width is NaN for n < 2, the mean NaN for
    n = 0. The one interval of the project: few-shot tasks (methods.fewshot_eval) and seeds (tools.report)."""
    import numpy as np
    import scipy.stats

    values = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64)
    n = len(values)
    mean = float(values.mean()) if n else math.nan
    if n < 2:
        return mean, math.nan
    return mean, float(scipy.stats.sem(values) * scipy.stats.t.ppf((1 + confidence) / 2, n - 1))


def read_metrics(csv_path: Path) -> list[dict]:
    """The rows of a metrics CSV, numbers parsed (for tests and reports)."""
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    return [{k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items()} for row in rows]


class MeanTracker:
    """Sample-weighted means of per-batch values and plain totals (`total`), kept on the device until read (no sync
    per step). Values whose name contains "loss" are watched: the first step (`step`, set by the engine) at which one
    is not finite is remembered, so a diverging run can be stopped with the step named. The state goes into
    mid-epoch checkpoints (`state_dict`)."""

    def __init__(self):
        self.sums: dict = {}
        self.counts: dict = {}
        self.totals: dict = {}
        self.first_nonfinite: dict = {}  # loss name -> step (a device tensor; -1 while finite)
        self.step = 0

    def add(self, name: str, value, count: int = 1) -> None:
        value = value.detach() if hasattr(value, "detach") else value
        self.sums[name] = self.sums.get(name, 0.0) + value * count
        self.counts[name] = self.counts.get(name, 0) + count
        if "loss" in name and hasattr(value, "isfinite"):
            import torch

            seen = self.first_nonfinite.get(name, torch.full((), -1, device=value.device))
            self.first_nonfinite[name] = torch.where((seen < 0) & ~value.isfinite(), self.step, seen)

    def total(self, name: str, amount: int = 1) -> None:
        self.totals[name] = self.totals.get(name, 0) + amount

    def nonfinite(self) -> tuple[str, int] | None:
        """(loss name, first step) of the first loss that was not finite, if any (syncs with the device)."""
        bad = [(int(step), name) for name, step in self.first_nonfinite.items() if int(step) >= 0]
        return (min(bad)[1], min(bad)[0]) if bad else None

    def result(self, session) -> dict[str, float]:
        """The means and totals; in a distributed run, over every rank's samples."""
        import torch

        names = sorted(self.sums)
        totals = sorted(self.totals)
        if not names and not totals:
            return {}
        table = torch.tensor([[float(self.sums[n]), float(self.counts[n])] for n in names]
                             + [[float(self.totals[n]), 1.0] for n in totals], dtype=torch.float64)
        if session.world_size > 1:
            import torch.distributed as dist

            table = table.to(session.device)
            dist.all_reduce(table)
        table = table.cpu()
        means = {n: (s / c).item() for n, (s, c) in zip(names, table[:len(names)])}
        return means | {n: int(round(s.item())) for n, (s, _) in zip(totals, table[len(names):])}

    def state_dict(self) -> dict:
        import torch

        def plain(value):
            return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value

        return {"sums": {k: plain(v) for k, v in self.sums.items()}, "counts": dict(self.counts),
                "totals": dict(self.totals), "first_nonfinite": {k: plain(v) for k, v in self.first_nonfinite.items()}}

    def load_state_dict(self, state: dict, device) -> None:
        import torch

        def placed(value):
            return value.to(device) if isinstance(value, torch.Tensor) else value

        self.sums = {k: placed(v) for k, v in state["sums"].items()}
        self.counts, self.totals = dict(state["counts"]), dict(state["totals"])
        self.first_nonfinite = {k: placed(v) for k, v in state["first_nonfinite"].items()}
