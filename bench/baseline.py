"""A bench's figures kept in a JSON file (`--save FILE`) and compared with an earlier run's (`--baseline FILE`).

One file holds several benches: a section per bench script (`bench_maxl`, `bench_mela`), each the list of the JSON
rows that bench printed, so `make bench SAVE=figures.json` and then `make bench BASELINE=figures.json` use one file.
Compare only files written on the same machine: the figures are seconds and rates of that machine.

A row is matched with the baseline's row naming the same measurement (its `method`, `bench` or `ratio`, and `nproc`).
A figure is compared when its name says which way is better: rates (`..._per_s`, `..._per_s_...`, `..._speedup`) are better
higher, times (`..._s`, `seconds_...`) and shares of a reference (`..._over_...`) lower. The ratio printed is new /
baseline; a change for the worse by more than `--slower-than` (default 10%) is flagged SLOWER.
"""
import json
import platform
import re
from pathlib import Path

IDENTITY = ("method", "bench", "ratio", "nproc")


def add_arguments(parser) -> None:
    parser.add_argument("--save", metavar="FILE", help="write this run's figures into FILE (its section of it)")
    parser.add_argument("--baseline", metavar="FILE", help="print each figure next to FILE's (an earlier --save on "
                                                          "the same machine) and flag slowdowns")
    parser.add_argument("--slower-than", type=float, default=0.10, metavar="SHARE",
                        help="flag a figure worse than the baseline's by more than this share (default 0.10)")


def check_readable(path: str | None) -> None:
    """A baseline that cannot be compared is refused before the measuring starts."""
    if path is None:
        return
    try:
        json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: --baseline {path}: cannot be read as a figures file ({exc}); give a file written "
                         f"by --save") from None


def better(name: str) -> str | None:
    """'higher' or 'lower' for a figure, None for a setting (batch size, threads...) or a memory figure."""
    if re.search(r"_per_s(_|$)", name) or name.endswith("speedup"):
        return "higher"
    if name.endswith("_s") or name.startswith("seconds_") or "_over_" in name:
        return "lower"
    return None


def key(row: dict) -> tuple:
    return tuple((field, row[field]) for field in IDENTITY if field in row)


def compare(bench: str, rows: list[dict], baseline: dict, slower_than: float) -> list[str]:
    """One line per figure that the baseline also has: `<bench> <row> <figure>: new (baseline old) x ratio`, with
    SLOWER when it is worse by more than `slower_than`, and a line per row the baseline lacks."""
    old_rows = {key(row): row for row in baseline.get("benches", {}).get(bench, [])}
    lines = []
    for row in rows:
        name = " ".join(f"{field}={value}" for field, value in key(row))
        old = old_rows.get(key(row))
        if old is None:
            lines.append(f"{bench} {name}: not in the baseline")
            continue
        for figure, value in row.items():
            direction = better(figure)
            numbers = isinstance(value, (int, float)) and isinstance(old.get(figure), (int, float))
            if direction is None or not numbers:
                continue
            ratio = value / old[figure] if old[figure] else float("inf")
            worse = ratio > 1 + slower_than if direction == "lower" else ratio < 1 / (1 + slower_than)
            lines.append(f"{bench} {name} {figure}: {value:g} (baseline {old[figure]:g}) x{ratio:.3f}"
                         + ("  SLOWER" if worse else ""))
        changed = [f for f, v in row.items() if better(f) is None and f in old and old[f] != v]
        if changed:
            lines.append(f"{bench} {name}: measured with other settings than the baseline ("
                         + ", ".join(f"{f}={row[f]} vs {old[f]}" for f in changed) + ")")
    return lines


def finish(bench: str, rows: list[dict], args) -> None:
    """After a bench's rows: the comparison with --baseline (printed), then --save (this bench's section)."""
    if args.baseline:
        baseline = json.loads(Path(args.baseline).read_text())
        machine = baseline.get("machine")
        if machine and machine != this_machine():
            print(f"# note: the baseline was written on {machine}, this is {this_machine()}", flush=True)
        for line in compare(bench, rows, baseline, args.slower_than):
            print(line, flush=True)
    if args.save:
        path = Path(args.save)
        figures = json.loads(path.read_text()) if path.is_file() else {}
        figures["machine"] = this_machine()
        figures.setdefault("benches", {})[bench] = rows
        path.write_text(json.dumps(figures, indent=1) + "\n")


def this_machine() -> str:
    return f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip()
