"""The MAXL phase-1 and meta steps of this tree and of an earlier commit, side by side in one process.

    python bench/bench_commits.py REV [--rounds 8] [--batch-size 100] [--width 1.0]

Each tree's own `bench/bench_maxl.py` builds its MaxlJob on the same random batch (the trees' modules are loaded one
after the other into this process, each keeping its own); then the steps alternate, A B, B A, A B, ..., so that
whatever the machine does meanwhile (other jobs, clock changes) weighs on both. Prints one JSON line per step kind:
the median seconds of each tree and the median of the per-round ratios this / REV. Separate processes, one after the
other, compare two steps ~15% apart as equal or 20% apart on a shared machine; alternating in one process does not.
REV is checked out into a temporary worktree that is removed afterwards; it must have bench/bench_maxl.py with
`build_job(method, args, channels_last, scratch)` (003a272 and later).
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "dataset", "engine", "methods", "models", "tools")


def load_steps(tree: Path, args, scratch: str) -> dict:
    """`{"phase1": f, "meta": f}` of a MaxlJob built by `tree`'s bench code, its modules kept apart from the others."""
    import torch
    from hydra.core.global_hydra import GlobalHydra

    for name in [n for n in sys.modules if n.split(".")[0] in PACKAGES]:
        del sys.modules[name]  # the objects built below keep their own modules alive
    GlobalHydra.instance().clear()
    sys.path.insert(0, str(tree))
    try:
        from bench.bench_maxl import build_job
        if not Path(sys.modules[build_job.__module__].__file__).is_relative_to(tree):
            raise SystemExit(f"error: bench_commits: {tree} was not loaded; run it as python bench/bench_commits.py")
        torch.manual_seed(0)
        job_args = argparse.Namespace(width=args.width, batch_size=args.batch_size, device="cpu", precision="fp32",
                                      image_size=32, iters=1)
        job, x, targets = build_job("maxl", job_args, channels_last=True, scratch=scratch)
    finally:
        sys.path.remove(str(tree))
    return {"phase1": lambda: job.multitask_step(x, targets, with_cossim=False),
            "meta": lambda: job.generator_step(x, targets)}


def alternate(steps: dict, rounds: int) -> dict:
    """Seconds of each tree's step, per round, the order of the two trees swapped every round."""
    names = list(steps)
    for step in steps.values():
        step()  # warm-up
    seconds = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            began = time.perf_counter()
            steps[name]()
            seconds[name].append(time.perf_counter() - began)
    return seconds


def main():
    parser = argparse.ArgumentParser(description="MAXL steps of this tree against an earlier commit, in one process")
    parser.add_argument("rev", help="the earlier commit (any git revision)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--width", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_commits_") as scratch:
        old = Path(scratch) / "tree"
        checkout = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.rev],
                                  capture_output=True, text=True)
        if checkout.returncode:
            raise SystemExit(f"error: {args.rev}: cannot be checked out ({checkout.stderr.strip()}); give a commit "
                             f"of this repository")
        try:
            import torch  # after the checkout: a refused commit costs no import

            trees = {args.rev: load_steps(old, args, scratch), "this": load_steps(ROOT, args, scratch)}
            for kind in ("phase1", "meta"):
                seconds = alternate({name: steps[kind] for name, steps in trees.items()}, args.rounds)
                ratios = [new / earlier for earlier, new in zip(seconds[args.rev], seconds["this"])]
                print(json.dumps({"step": kind, f"{args.rev}_s": round(statistics.median(seconds[args.rev]), 4),
                                  "this_s": round(statistics.median(seconds["this"]), 4),
                                  f"this_over_{args.rev}": round(statistics.median(ratios), 3),
                                  "per_round": [round(r, 3) for r in ratios], "threads": torch.get_num_threads()}),
                      flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)


if __name__ == "__main__":
    main()
