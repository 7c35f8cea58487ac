"""Seconds per MAXL iteration, per method: phase 1 (multi-task step) and meta step (generator update).

    python bench/bench_maxl.py [--methods single,human,maxl,maxl_first_order,reference] [--batch-size 100]
                               [--image-size 32] [--width 1.0] [--device cpu|cuda] [--iters 5]
                               [--nproc 1] [--precision fp32|bf16] [--save FILE] [--baseline FILE]

Prints one JSON line per method. Each method runs in its own process (or, with --nproc N, N processes under
torchrun, each with batch_size / N images: the global batch stays the same) so that peak memory is its own.
images_per_s counts the phase-1 and meta passes over the global batch.
`reference` times the reference implementation's procedure, written here with this
project's models: COSSIM on every phase-1 iteration (two extra backward passes), generator forward with
autograd in phase 1 (its backward wasted), and a meta step that takes the inner gradient with
create_graph=True and back-propagates the post-step loss into every leaf; NCHW layout. It is the yardstick for
the speed comparison (the maxl pair time as a share of the reference time, both measured in one run).
--save and --baseline keep the figures and compare them with an earlier run's (bench/baseline.py).
"""
import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import baseline  # noqa: E402
from bench.launch import run_processes  # noqa: E402


def build_job(method: str, args, channels_last: bool, scratch: str):
    """MaxlJob on one random batch (a CIFAR-100-shaped hierarchy), its session writing only to `scratch`."""
    from dataset.cifar100 import hierarchy_labels
    from dataset.hierarchical import HierarchicalData
    from engine import Session, compose
    from engine.script import Script
    from methods.maxl import MaxlJob
    from methods.scripts import SCRIPTS

    cfg = compose(SCRIPTS["maxl_train"], [f"method={method}", f"model.width_mult={args.width}", f"batch_size={args.batch_size}",
                                 f"device={args.device}", f"channels_last={channels_last}", "num_workers=0",
                                 "dataset=cifar100", "cossim_every=50", f"precision={args.precision}",
                                 f"workspace={scratch}"])
    rng = np.random.default_rng(0)
    n, size = args.batch_size, args.image_size
    fine = rng.integers(0, 100, n)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    every_class = np.arange(100)  # a test split with every class, so that a small batch still has all levels
    test_images = rng.integers(0, 256, (100, size, size, 3), dtype=np.uint8)
    data = HierarchicalData("bench", images, hierarchy_labels(fine // 5, fine), test_images,
                            hierarchy_labels(every_class // 5, every_class))
    session = Session(cfg, Path(scratch) / "run", Script("maxl_train", lr_key="lr", writes_checkpoints=False))
    job = MaxlJob(cfg, data, session)
    x, targets, _ = next(iter(job.train_loader))
    return job, session.to_device(x), targets.to(session.device)


def reference_steps(job, x, targets):
    """The reference's phase-1 and meta iterations (see the module docstring)."""
    from torch.func import functional_call

    from methods.losses import focal_loss, negative_entropy
    from methods.maxl import batch_statistics

    model, generator, gamma, y = job.model, job.generator, job.cfg.focal_gamma, targets[:, 0]
    params = dict(model.named_parameters())
    shared = model.shared_parameters()

    def phase1():
        job.optimizer.zero_grad()
        job.gen_optimizer.zero_grad()
        pri, aux = model(x)
        soft = generator(x, y)
        pri_loss = focal_loss(pri.log_softmax(1), y, gamma)
        aux_loss = focal_loss(aux.log_softmax(1), soft, gamma)
        torch.autograd.grad(pri_loss, shared, retain_graph=True)
        torch.autograd.grad(aux_loss, shared, retain_graph=True)
        (pri_loss + aux_loss).backward()
        job.optimizer.step()

    def meta():
        job.optimizer.zero_grad()
        job.gen_optimizer.zero_grad()
        pri, aux = model(x)
        soft = generator(x, y)
        inner = focal_loss(pri.log_softmax(1), y, gamma) + focal_loss(aux.log_softmax(1), soft, gamma)
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        fast = {n: p - job.cfg.lr * g for (n, p), g in zip(params.items(), grads)}
        with batch_statistics(model):
            after = functional_call(model, fast, (x,))[0]
        entropy = negative_entropy(soft.mean(0))  # the batch-mean label distribution's (one process)
        (focal_loss(after.log_softmax(1), y, gamma) + job.cfg.entropy_weight * entropy).backward()
        job.gen_optimizer.step()

    return phase1, meta


def timed(step, device, iters: int) -> float:
    step()  # warm-up (allocator, oneDNN/cuDNN plans)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure(method: str, args, scratch: str) -> dict:
    torch.manual_seed(0)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reference = method == "reference"
    job, x, targets = build_job("maxl" if reference else method, args, channels_last=not reference,
                                scratch=scratch)
    device = job.session.device
    if reference:
        phase1, meta = reference_steps(job, x, targets)
    else:
        phase1 = lambda: job.multitask_step(x, targets, with_cossim=False)  # noqa: E731
        meta = (lambda: job.generator_step(x, targets)) if job.learns_labels else None  # noqa: E731
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = {"method": method, "phase1_s": round(timed(phase1, device, args.iters), 4)}
    result["meta_s"] = round(timed(meta, device, args.iters), 4) if meta else None
    result["pair_s"] = round(result["phase1_s"] + (result["meta_s"] or 0), 4)
    result["images_per_s"] = round(args.batch_size * (2 if meta else 1) / result["pair_s"], 1)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"  # bytes; CPU: growth of the peak RSS (KiB)
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) * 1024)
    result["peak_mem_mb"] = round(peak / 2**20, 1)
    result |= {"batch_size": args.batch_size, "image_size": args.image_size, "width": args.width,
               "device": device.type, "nproc": job.session.world_size, "precision": job.session.precision,
               "threads": torch.get_num_threads()}
    job.session.close()
    return result if job.session.is_main else None


def main(argv=None):
    parser = argparse.ArgumentParser(description="MAXL iteration benchmark")
    parser.add_argument("--methods", default="single,human,maxl,maxl_first_order,reference")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--nproc", default="1", help="processes (torchrun; gloo on CPU, nccl on CUDA); a list such "
                                                     "as 1,2 measures each")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    baseline.add_arguments(parser)
    args = parser.parse_args(argv)
    baseline.check_readable(args.baseline)
    if args.one:
        with tempfile.TemporaryDirectory(prefix="bench_maxl_") as scratch:
            result = measure(args.one, args, scratch)
        if result:
            print(json.dumps(result))
        return
    settings = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k not in ("methods", "one", "nproc", "save", "baseline", "slower_than")]
    rows = []
    for nproc in (int(n) for n in args.nproc.split(",")):
        # The reference procedure is single-process (it has no gradient reduction).
        methods = [m for m in args.methods.split(",") if nproc == 1 or m != "reference"]
        results = {method: run_one(method, nproc, settings) for method in methods}
        rows += results.values()
        if "maxl" in results and "reference" in results:
            ratios = {"nproc": nproc,
                      "maxl_pair_over_reference": round(results["maxl"]["pair_s"] / results["reference"]["pair_s"], 3)}
            if "single" in results:
                ratios["maxl_phase1_over_single"] = round(results["maxl"]["phase1_s"] / results["single"]["phase1_s"], 3)
            print(json.dumps(ratios), flush=True)
            rows.append(ratios)
    baseline.finish("bench_maxl", rows, args)


def run_one(method: str, nproc: int, settings: list[str]) -> dict:
    """Measure one method in fresh processes and print its JSON line."""
    output = run_processes(__file__, ["--one", method, *settings], nproc, port=29599)
    result = json.loads(output.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
