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

    def close(self) -> None:
        self.tensorboard.close()


def read_metrics(csv_path: Path) -> list[dict]:
    """The rows of a metrics CSV, numbers parsed (for tests and reports)."""
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    return [{k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items()} for row in rows]


class MeanTracker:
    """Sample-weighted means of per-batch values, kept on the device until read (no sync per step)."""

    def __init__(self):
        self.sums: dict = {}
        self.counts: dict = {}

    def add(self, name: str, value, count: int = 1) -> None:
        value = value.detach() if hasattr(value, "detach") else value
        self.sums[name] = self.sums.get(name, 0.0) + value * count
        self.counts[name] = self.counts.get(name, 0) + count

    def result(self, session=None) -> dict[str, float]:
        """The means; in a distributed run, over every rank's samples."""
        import torch

        names = sorted(self.sums)
        if not names:
            return {}
        totals = torch.tensor([[float(self.sums[n]), float(self.counts[n])] for n in names], dtype=torch.float64)
        if session is not None and session.world_size > 1:
            import torch.distributed as dist

            totals = totals.to(session.device)
            dist.all_reduce(totals)
        return {n: (s / c).item() for n, (s, c) in zip(names, totals.cpu())}
