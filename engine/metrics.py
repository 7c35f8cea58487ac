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
        self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        for row in history or []:  # a resumed run rewrites what the interrupted one recorded
            self.write(row)

    def write(self, row: dict) -> None:
        self.history.append(dict(row))
        columns = list(dict.fromkeys(key for r in self.history for key in r))
        with open(self.csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, row["epoch"])
        self.tensorboard.flush()

    def plot(self) -> Path | None:
        """One panel per metric group (the part of the name before '/'), epochs on the x axis."""
        if not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = defaultdict(list)
        for key in dict.fromkeys(k for r in self.history for k in r):
            if key in ("epoch",) + NOT_COMPARED:
                continue
            kind = "loss" if "loss" in key else "acc" if "acc" in key else key.split("/")[-1]
            groups[kind].append(key)
        columns = min(3, len(groups))
        rows = -(-len(groups) // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.5 * rows), squeeze=False)
        for ax in axes.flat[len(groups):]:
            ax.axis("off")
        for ax, (kind, keys) in zip(axes.flat, groups.items()):
            for key in keys:
                points = [(r["epoch"], r[key]) for r in self.history
                          if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
                if points:
                    ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key)
            ax.set_title(kind)
            ax.set_xlabel("epoch")
            ax.legend(fontsize="small")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.plot_path, dpi=100)
        plt.close(fig)
        return self.plot_path

    def write_hparams(self, cfg, summary: dict) -> None:
        """The run's settings and final numbers in TensorBoard's HPARAMS tab."""
        from engine.config import leaves

        settings = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                    for k, v in leaves(cfg, skip={"hydra"}).items()}
        finals = {f"final/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and k != "epochs"}
        self.tensorboard.add_hparams(settings, finals, run_name="hparams")

    def close(self) -> None:
        self.tensorboard.close()


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

    def result(self, session=None) -> dict[str, float]:
        """The means and totals; in a distributed run, over every rank's samples."""
        import torch

        names = sorted(self.sums)
        totals = sorted(self.totals)
        if not names and not totals:
            return {}
        table = torch.tensor([[float(self.sums[n]), float(self.counts[n])] for n in names]
                             + [[float(self.totals[n]), 1.0] for n in totals], dtype=torch.float64)
        if session is not None and session.world_size > 1:
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
