"""MeLa's hot paths, one JSON line each:

    python bench/bench_mela.py [--only meta_step,meta_step_reference,meta_eval,supervised,supervised_reference,
                               features] [--device cpu|cuda] [--nproc 1] [--precision fp32|bf16]
                               [--no-channels-last] [--compile] [--quick] [--image-size 84] [--width 1.0]
                               [--iters 3] [--save FILE] [--baseline FILE] ...

meta_step   learn_meta_repr's step: ResNet-12, n-way k-shot q-query tasks: forward + MetaLS + backward + SGD step
meta_eval   logistic-regression tasks per second on given features, 1-shot and 5-shot
supervised  pseudo-label / sup_baseline training images per second (ResNet-12 + linear head, SGD)
features    feature extraction images per second (eval mode, inference_mode, large batches)
meta_step_reference, supervised_reference
            the same two steps written straightforwardly in this file, with this project's ResNet-12: NCHW, one
            process, the ridge solve through an explicit inverse, default cdist, a NaN check and the metrics read
            to the host every step (.item()), torch's default optimiser step. With both sides of a pair measured,
            a ratio row follows: meta_step_over_reference (seconds per step) and supervised_speedup (images/s).

meta_step, supervised and features run through the engine's Session as the scripts do (DDP, autocast,
channels-last, compile), with --nproc N in N processes under torchrun (gloo on CPU, nccl on CUDA) that share the
global batch (--tasks-per-step, --batch-size, --feature-batch); --nproc 1,2 measures each. Their figures are the
global throughput of `--iters` steps timed together after one warm-up step. meta_eval runs once, in one process;
its times are the best of `--iters` repetitions after one warm-up. --quick shrinks everything for a smoke run.
--save and --baseline keep the figures and compare them with an earlier run's (bench/baseline.py).
The labeler's cost within learn_labeler's step is bench/bench_labeler.py's.
"""
import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import baseline  # noqa: E402
from bench.launch import run_processes  # noqa: E402
from engine import Session, compose  # noqa: E402
from engine.metrics import MeanTracker  # noqa: E402
from engine.script import Script  # noqa: E402
from methods.fewshot_eval import extract_features, task_accuracies  # noqa: E402
from methods.meta_ls import MetaLS, meta_train_step  # noqa: E402
from methods.scripts import SCRIPTS  # noqa: E402
from methods.supervised import build_classifier, supervised_train_step  # noqa: E402
from models import create_model  # noqa: E402

BENCHES = ("meta_step", "meta_step_reference", "meta_eval", "supervised", "supervised_reference", "features")
SESSION_BENCHES = ("meta_step", "supervised", "features")  # through the engine: --nproc, --precision, --compile


def best_time(fn, iters: int, device: torch.device) -> float:
    """Best wall time of `iters` calls after a warm-up call (synchronising CUDA around each)."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def open_session(args, scratch: str) -> Session:
    """A Session as the scripts get it (this rank's device, precision, layout, compile), writing to `scratch`."""
    cfg = compose(SCRIPTS["sup_baseline"], [f"device={args.device}", f"precision={args.precision}", f"compile={args.compile}",
                                   f"channels_last={args.channels_last}", "num_workers=0", "progress=false",
                                   f"workspace={scratch}", "overwrite=true"])
    return Session(cfg, Path(scratch) / "run", Script("bench_mela", writes_checkpoints=False))


SHARED_BATCHES = {"meta_step": "tasks_per_step", "supervised": "batch_size", "features": "feature_batch"}


def check_shares(args, benches: list[str], nprocs: list[int]) -> None:
    """Before anything is measured: every global batch an engine bench splits over its processes divides evenly."""
    for name in benches:
        total = getattr(args, SHARED_BATCHES[name])
        for nproc in nprocs:
            if total % nproc:
                raise SystemExit(f"error: --{SHARED_BATCHES[name].replace('_', '-')} {total} is not divisible by "
                                 f"{nproc} processes: choose a multiple of {nproc}")


def local_share(total: int, session: Session) -> int:
    return total // session.world_size  # divisible: check_shares


def train_epoch(step, model, batches, optimizer, session: Session) -> dict:
    """A training epoch as the engine runs one: `step` (meta_train_step, supervised_train_step) on every batch."""
    tracker = MeanTracker()
    for batch in batches:
        step(model, batch, optimizer, session, tracker)
    return tracker.result(session)


def timed_epoch(run_epoch, args, session: Session) -> float:
    """Seconds for `--iters` steps of a real training epoch, after a one-step warm-up epoch, all ranks together."""
    run_epoch(1)
    session.barrier()
    if session.device.type == "cuda":
        torch.cuda.synchronize(session.device)
    start = time.perf_counter()
    run_epoch(args.iters)
    if session.device.type == "cuda":
        torch.cuda.synchronize(session.device)
    session.barrier()
    return time.perf_counter() - start


def bench_meta_step(args, session: Session):
    n, k, q, size = args.n_ways, args.n_shots, args.n_queries, args.image_size
    backbone = session.prepare(create_model("resnet12", width_mult=args.width))
    learner = session.distribute(MetaLS(backbone, n_ways=n, lam=1e-3))
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    t = local_share(args.tasks_per_step, session)
    task = (torch.randn(t, n * k, 3, size, size), torch.arange(n).repeat_interleave(k).expand(t, -1),
            torch.randn(t, n * q, 3, size, size), torch.arange(n).repeat_interleave(q).expand(t, -1))
    seconds = timed_epoch(lambda steps: train_epoch(meta_train_step, learner, [task] * steps, optimizer, session),
                          args, session)
    tasks_per_s = args.iters * args.tasks_per_step / seconds
    return {"seconds_per_step": round(seconds / args.iters, 4), "tasks_per_s": round(tasks_per_s, 3),
            "images_per_step": args.tasks_per_step * n * (k + q), "tasks_per_step": args.tasks_per_step,
            "image_size": size, "width": args.width}


def synthetic_split(n_classes: int, per_class: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    features = torch.randn(n_classes, dim, generator=g)[labels] + 3 * torch.randn(len(labels), dim, generator=g)
    return features, labels


def bench_meta_eval(args, device):
    features, labels = synthetic_split(args.eval_classes, 600, args.feat_dim, seed=1)
    features = F.normalize(features, dim=1)
    row = {"tasks": args.eval_tasks, "n_jobs": args.n_jobs, "feat_dim": args.feat_dim}
    for shots in (1, 5):
        run = partial(task_accuracies, features, labels, args.n_ways, shots, args.n_queries, args.eval_tasks,
                      n_jobs=args.n_jobs)
        seconds = best_time(run, 1, device)
        row[f"tasks_per_s_{shots}shot"] = round(args.eval_tasks / seconds, 2)
    return row


def bench_supervised(args, session: Session):
    backbone = create_model("resnet12", width_mult=args.width)
    model = session.prepare(build_classifier(backbone, args.sup_classes, rotate_aug=True))
    train_model = session.distribute(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    b = local_share(args.batch_size, session)
    batch = (torch.randn(b, 3, args.image_size, args.image_size), torch.randint(0, args.sup_classes * 4, (b,)))
    seconds = timed_epoch(
        lambda steps: train_epoch(supervised_train_step, train_model, [batch] * steps, optimizer, session), args,
        session)
    return {"images_per_s": round(args.iters * args.batch_size / seconds, 2), "batch_size": args.batch_size,
            "image_size": args.image_size, "width": args.width, "classes": args.sup_classes * 4}


def reference_timed(step, args) -> float:
    """Seconds for `--iters` calls of `step` after one warm-up call (a reference bench: one process)."""
    step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def reference_meta_ls_loss(features, support_y, query_y, n_ways: int, lam: float):
    """One task's MetaLS loss, written straightforwardly (the same function as methods.meta_ls.meta_ls_loss)."""
    n_support = len(support_y)
    x = torch.cat([features, torch.ones(len(features), 1, device=features.device)], 1)
    support_t, query_t = F.one_hot(support_y, n_ways).float(), F.one_hot(query_y, n_ways).float()

    def ridge(x, t):
        return x.t() @ torch.inverse(x @ x.t() + lam * torch.eye(len(x), device=x.device)) @ t

    w_support = ridge(x[:n_support], support_t)
    loss = F.mse_loss(x[n_support:] @ w_support, query_t)
    labels = torch.cat([support_y, query_y])
    in_support = torch.arange(len(labels), device=labels.device) < n_support
    similar = (labels[:, None] == labels[None]) & (in_support[:, None] == in_support[None])
    hinge = F.hinge_embedding_loss(torch.cdist(features, features), similar.float() * 2 - 1, margin=1.0)
    return loss + hinge + F.mse_loss(w_support, ridge(x, torch.cat([support_t, query_t])))


def bench_meta_step_reference(args, device):
    n, k, q, size, t = args.n_ways, args.n_shots, args.n_queries, args.image_size, args.tasks_per_step
    backbone = create_model("resnet12", width_mult=args.width).to(device)
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    labels = torch.arange(n, device=device)
    support_y, query_y = labels.repeat_interleave(k), labels.repeat_interleave(q)
    tasks = [(torch.randn(n * k, 3, size, size, device=device), torch.randn(n * q, 3, size, size, device=device))
             for _ in range(t)]

    def step():
        backbone.train()
        optimizer.zero_grad()
        loss = torch.stack([reference_meta_ls_loss(backbone(torch.cat([s, q])), support_y, query_y, n, 1e-3)
                            for s, q in tasks]).mean()
        if torch.isnan(loss).item():
            return
        loss.backward()
        optimizer.step()
        loss.item()  # logged every step

    seconds = reference_timed(step, args)
    return {"seconds_per_step": round(seconds / args.iters, 4), "tasks_per_s": round(args.iters * t / seconds, 3),
            "images_per_step": t * n * (k + q), "tasks_per_step": t, "image_size": size, "width": args.width}


def bench_supervised_reference(args, device):
    model = build_classifier(create_model("resnet12", width_mult=args.width), args.sup_classes, rotate_aug=True)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    targets = torch.randint(0, args.sup_classes * 4, (args.batch_size,), device=device)

    def step():
        model.train()
        logits = model(images)
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item(), (logits.argmax(1) == targets).float().mean().item()  # logged every step

    seconds = reference_timed(step, args)
    return {"images_per_s": round(args.iters * args.batch_size / seconds, 2), "batch_size": args.batch_size,
            "image_size": args.image_size, "width": args.width, "classes": args.sup_classes * 4}


def reference_ratios(rows: list[dict]) -> dict | None:
    """This project's steps against the straightforward ones, from rows of one invocation (one process each)."""
    one = {row["bench"]: row for row in rows if row.get("nproc", 1) == 1}
    ratios = {}
    if "meta_step" in one and "meta_step_reference" in one:
        ratios["meta_step_over_reference"] = round(one["meta_step"]["seconds_per_step"]
                                                   / one["meta_step_reference"]["seconds_per_step"], 3)
    if "supervised" in one and "supervised_reference" in one:
        ratios["supervised_speedup"] = round(one["supervised"]["images_per_s"]
                                             / one["supervised_reference"]["images_per_s"], 3)
    return {"ratio": "mela_vs_reference", **ratios} if ratios else None


def bench_features(args, session: Session):
    """Each rank extracts its share of the batches (as meta_eval does before gathering the features)."""
    model = session.prepare(create_model("resnet12", width_mult=args.width))
    b = local_share(args.feature_batch, session)
    batch = (session.to_device(torch.randn(b, 3, args.image_size, args.image_size)), torch.zeros(b, dtype=torch.long))
    seconds = timed_epoch(lambda steps: extract_features(model, [batch] * steps, session.device), args, session)
    return {"images_per_s": round(args.iters * args.feature_batch / seconds, 2), "batch_size": args.feature_batch,
            "image_size": args.image_size, "width": args.width}


def run_session_benches(names: list[str], args) -> list[dict]:
    """The engine benches in this process (one rank of a torchrun group, or the only process)."""
    with tempfile.TemporaryDirectory(prefix="bench_mela_") as scratch:
        session = open_session(args, scratch)
        rows = []
        for name in names:
            row = globals()[f"bench_{name}"](args, session)
            rows.append({"bench": name, "device": session.device.type, "nproc": session.world_size,
                         "precision": session.precision, "channels_last": session.channels_last,
                         "compile": session.compile_enabled, "threads": torch.get_num_threads(), **row})
        session.close()
    return rows if session.is_main else []


def run_in_processes(names: list[str], nproc: int, argv: list[str]) -> list[dict]:
    """The engine benches in `nproc` fresh processes under torchrun; rank 0's rows."""
    output = run_processes(__file__, [*argv, "--only", ",".join(names), "--rank-process"], nproc, port=29598)
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every bench")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--width", type=float, default=1.0, help="ResNet-12 width_mult")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="NHWC layout, the engine's default (channels_last=true)")
    parser.add_argument("--n-ways", type=int, default=5)
    parser.add_argument("--n-shots", type=int, default=5)
    parser.add_argument("--n-queries", type=int, default=15)
    parser.add_argument("--tasks-per-step", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64, help="supervised training batch")
    parser.add_argument("--sup-classes", type=int, default=64, help="classes before rotation x4")
    parser.add_argument("--feature-batch", type=int, default=256)
    parser.add_argument("--feat-dim", type=int, default=640)
    parser.add_argument("--eval-classes", type=int, default=20)
    parser.add_argument("--eval-tasks", type=int, default=200)
    parser.add_argument("--n-jobs", type=int, default=1)
    parser.add_argument("--nproc", default="1", help="processes for the engine benches (torchrun); a list such as "
                                                     "1,2 measures each")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the trained model (as compile=true)")
    parser.add_argument("--rank-process", action="store_true", help=argparse.SUPPRESS)
    baseline.add_arguments(parser)
    args = parser.parse_args(argv)
    baseline.check_readable(args.baseline)
    if args.quick:
        args.image_size, args.width, args.iters, args.batch_size, args.feature_batch = 32, 0.25, 1, 16, 64
        args.eval_tasks = 20
    names = args.only.split(",")
    for name in names:
        if name not in BENCHES:
            parser.error(f"unknown bench {name}: choose from {', '.join(BENCHES)}")
    engine_benches = [name for name in names if name in SESSION_BENCHES]
    check_shares(args, engine_benches, [int(n) for n in args.nproc.split(",")])
    if args.rank_process:
        for row in run_session_benches(engine_benches, args):
            print(json.dumps(row), flush=True)
        return
    device = torch.device(args.device)
    rows = []
    for name in names:
        if name not in SESSION_BENCHES:
            torch.manual_seed(0)
            row = {"bench": name, "device": str(device), "nproc": 1, "threads": torch.get_num_threads(),
                   **globals()[f"bench_{name}"](args, device)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    argv = sys.argv[1:] if argv is None else list(argv)
    for nproc in (int(n) for n in args.nproc.split(",")):
        if not engine_benches:
            break
        # torchrun would take a bench's --nproc for its own --nproc-per-node: the ranks get the default, 1.
        measured = run_session_benches(engine_benches, args) if nproc == 1 else \
            run_in_processes(engine_benches, nproc, strip_options(argv, ("--only", "--nproc", "--save", "--baseline")))
        for row in measured:
            print(json.dumps(row), flush=True)
        rows += measured
    ratios = reference_ratios(rows)
    if ratios:
        print(json.dumps(ratios), flush=True)
        rows.append(ratios)
    baseline.finish("bench_mela", rows, args)


def strip_options(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv without the given options and their values (both `--opt value` and `--opt=value`)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{option}=" for option in options)):
            kept.append(arg)
    return kept


if __name__ == "__main__":
    main()
