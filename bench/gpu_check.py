"""One command that proves the GPU path and measures it: `make gpu_check` (python bench/gpu_check.py [options]).

On one device (--device, default cuda; a test runs it with --device cpu at toy sizes):

1. Data: a CIFAR-100-layout hierarchy (read as dataset=synthetic_hier) and miniImageNet-layout pickles (read as
   dataset=synthetic_fs), written by the project's own generators into a fresh workspace under --out.
2. Scripts, one epoch of --steps optimiser steps each, at --width (full width by default), in each variant:
   fp32 (precision=fp32 compile=false), bf16 (precision=bf16 compile=false) and compile (precision=bf16
   compile=true, what device=cuda defaults to): maxl_train.py method=single, human and maxl (maxl adds a meta
   step to each multi-task step: 2 x --steps); learn_meta_repr.py, learn_labeler.py, fine_tune.py and
   sup_baseline.py; meta_eval.py in the first variant only (it trains nothing and extracts features in float32
   without autocast: precision and compile do not apply to it). The first variant (fp32 by default) is the chain
   learn_meta_repr -> learn_labeler -> fine_tune -> meta_eval, each from the previous one's checkpoint; the other
   variants' learn_labeler and fine_tune start from that chain's checkpoints (no chain of compiled runs).
   Each run is its own process with a timeout, forked from this one after it imported torch once (a script's
   file runs as __main__ with its command line, as `python script.py key=value ...` runs it, without paying
   torch's import again); --jobs runs go at a time.
3. Checks per run: exit status 0; the run's log says it ran on the device in the asked precision, compiled or
   not (the engine's line `device: cuda:0, precision bf16, compiled`: every model and batch goes through the
   session's device); on CUDA the process's peak of torch.cuda.max_memory_allocated is above 0 (its tensors
   really lived on the GPU); the steps it took, from its own records (epochs in metrics.csv, images or tasks per
   epoch from its log, batch from its config.yaml), equal the steps asked (learn_labeler: at most those, as its
   training set is the images of the tasks its labeler accepts; its batch takes them all in --steps steps).
4. Benches, each alone on the device after the scripts, in fp32 and bf16 (the precisions of the variants run):
   bench_maxl.py (single and maxl: the multi-task step and the MAXL pair), bench_mela.py (meta_step and
   supervised), bench_data.py (the data pipeline; on the CPU when it has no --device option). Their JSON lines
   are kept as printed.
5. gpu_check.md (printed) and gpu_check.json under --out: the device's name, per run and bench its status,
   steps, seconds, images/s; exit status 1 if any check failed. The workspace is removed when every check passed,
   kept for inspection otherwise.

Budget on one GPU, with the defaults (a hard bound: a step over its time is stopped and fails):
   device probe and data                  20 s
   scripts (22 runs, --jobs at a time)   240 s  (each run: 90 s, compiled 150 s; none starts after 240 s)
   bench_maxl.py, fp32 and bf16        2 x 35 s
   bench_mela.py, fp32 and bf16        2 x 35 s
   bench_data.py                          25 s
   in all                                425 s  (7 min 5 s; under 8 minutes with the tables and the start)
On a CPU every time is multiplied by --time-scale (default 4 there: the 8-minute bound is a GPU's).
"""
import argparse
import ast
import csv
import datetime
import importlib
import json
import math
import multiprocessing
import os
import re
import runpy
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {"fp32": {"precision": "fp32", "compile": False}, "bf16": {"precision": "bf16", "compile": False},
            "compile": {"precision": "bf16", "compile": True}}
MAXL_METHODS = ("single", "human", "maxl")
MAXL_CLASSES, MAXL_TEST_PER_CLASS = 100, 2  # the generated CIFAR-100 layout's fine classes; test images of each
N_WAYS, EVAL_CLASSES, IMAGES_PER_TASK_CLASS = 5, 5, 20  # 5-way tasks, 5 val and 5 test classes, 5 shots + 15 queries
ROTATIONS = 4  # sup_baseline's and learn_labeler's rotate augmentation: every image in 4 turns
# Seconds, on one GPU (multiplied by --time-scale)
BUDGET = {"setup": 20, "scripts": 240, "run": 90, "compiled_run": 150, "bench_maxl": 35, "bench_mela": 35,
          "bench_data": 25}
STOP_GRACE_S = 10  # after SIGTERM (the engine checkpoints and stops), then SIGKILL
# What a forked run would otherwise import itself: most of a script's start-up time (python -X importtime)
PRELOAD = ("torch", "torchvision", "torch._dynamo", "torch.func", "torch.utils.tensorboard", "hydra",
           "sklearn.metrics", "sklearn.linear_model", "matplotlib.pyplot", "engine.entry", "dataset.hierarchical",
           "methods.scripts", "methods.maxl", "methods.mela_jobs", "methods.label_inference",
           "methods.step_checkpoints")
DEVICE_LINE = re.compile(r"device: (\S+?)(?:, \d+ processes)?, precision (\w+)(, compiled)?$")
TRAINED = {"maxl_train": re.compile(r": (\d+) training and \d+ test images$"),
           "meta": re.compile(r"meta-training on (\d+) tasks per epoch"),
           "supervised": re.compile(r"supervised training on (\d+) images")}
FIGURES = ("phase1_s", "meta_s", "pair_s", "seconds_per_step", "images_per_step", "images_per_s", "tasks_per_s",
           "value", "peak_mem_mb")


# ---- processes ----------------------------------------------------------------------------------------------------

def _child(path: Path, argv: list[str], cwd: Path, env: dict, output: Path, probe: Path) -> None:
    """In the forked process: `python path argv...` without the interpreter's start, output into `output`; then
    the CUDA peak memory into `probe`."""
    os.setpgid(0, 0)  # its own process group: a stop reaches its loader workers and launched processes too
    handle = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    # streams of its own on those: not the parent's, which may hold unwritten output or be replaced (a caller's capture)
    sys.stdout = sys.stderr = open(handle, "w", buffering=1, closefd=False)
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [str(path), *argv]
    sys.path[0] = str(path.parent)  # as `python path` sets it
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        torch = sys.modules.get("torch")
        used = torch is not None and torch.cuda.is_initialized()
        probe.write_text(json.dumps({"cuda_peak_bytes": torch.cuda.max_memory_allocated() if used else None}))


@dataclass
class ForkedRun:
    """A forked run of a script or bench: its files in `folder` (output.txt, probe.json)."""

    path: Path
    argv: list[str]
    folder: Path
    env: dict
    timeout: float
    began: float = 0.0
    wall_s: float | None = None
    exit_code: int | None = None
    stopped: str = ""  # why it was stopped, if it was

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        context = multiprocessing.get_context("fork")  # this process keeps to one thread: see main
        self.began = time.perf_counter()
        self.process = context.Process(target=_child, args=(self.path, self.argv, self.folder, self.env, self.output,
                                                            self.folder / "probe.json"))
        self.process.start()
        try:
            os.setpgid(self.process.pid, self.process.pid)  # as the child does: whichever comes first
        except OSError:
            pass

    @property
    def output(self) -> Path:
        return self.folder / "output.txt"

    def poll(self, deadline: float) -> bool:
        """True once it has ended; stops it past its timeout or past `deadline` (a perf_counter time)."""
        if self.process.exitcode is None:
            now = time.perf_counter()
            if now - self.began > self.timeout:
                self.stop(f"over its {self.timeout:.0f} s")
            elif now > deadline:
                self.stop("over the phase's budget")
            else:
                return False
        self.process.join()
        self.wall_s = round(time.perf_counter() - self.began, 2)
        self.exit_code = self.process.exitcode
        return True

    def stop(self, why: str) -> None:
        self.stopped = why
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                return
            self.process.join(STOP_GRACE_S)
            if self.process.exitcode is not None:
                return

    def run(self) -> None:
        self.start()
        while not self.poll(math.inf):
            time.sleep(0.2)

    def peak_gpu_mb(self) -> float | None:
        probe = self.folder / "probe.json"
        if not probe.is_file():
            return None
        peak = json.loads(probe.read_text())["cuda_peak_bytes"]
        return None if peak is None else round(peak / 2**20, 1)


def device_info(folder: Path, timeout: float) -> dict:
    """The device's name and torch's version, asked in a forked process so that this one never initialises CUDA
    (forked runs could not use it then)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "device_info.py"
    script.write_text("import json, torch\n"
                      "cuda = torch.cuda.is_available()\n"
                      "print(json.dumps({'cuda': cuda, 'name': torch.cuda.get_device_name(0) if cuda else 'cpu',\n"
                      "                  'torch': torch.__version__}))\n")
    probe = ForkedRun(script, [], folder, {}, timeout)
    probe.run()
    if probe.exit_code != 0:
        raise SystemExit(f"error: the device probe failed:\n{probe.output.read_text()[-2000:]}")
    return json.loads(probe.output.read_text().strip().splitlines()[-1])


# ---- the plan ------------------------------------------------------------------------------------------------------

@dataclass
class Sizes:
    steps: int
    width: float
    image_size: int
    batch_size: int
    maxl_batch: int
    eval_tasks: int

    @property
    def maxl_per_class(self) -> int:
        """Train images per fine class of the MAXL data: --steps batches in all."""
        return self.steps * self.maxl_batch // MAXL_CLASSES

    @property
    def images_per_class(self) -> int:
        """Images per class of the few-shot data: one supervised batch of a class in its 4 turns."""
        return self.batch_size // ROTATIONS

    @property
    def labeler_k(self) -> int:
        """3 centroids per train class rounded up to a multiple of 15, as the generated datasets' configs choose."""
        return 15 * math.ceil(3 * self.steps / 15)

    @property
    def labeler_tasks(self) -> int:
        """Four times the tasks whose keys initialise the K centroids: enough hits for more than n_ways centroids to
        survive the first pruning (with n_ways left, every task hits all of them and the next pass prunes all)."""
        return 4 * self.labeler_k // N_WAYS

    @property
    def labeler_batch(self) -> int:
        """learn_labeler's batch: its training items (every image of every task in 4 turns, when the labeler
        accepts every task) in --steps steps; fewer steps when it rejects tasks."""
        return math.ceil(self.labeler_tasks * N_WAYS * IMAGES_PER_TASK_CLASS * ROTATIONS / self.steps)


@dataclass
class ScriptRun:
    script: str
    variant: str
    label: str  # e.g. "method=single"
    overrides: list[str]
    expected_steps: int | None
    fewer_allowed: bool = False  # learn_labeler: its labeler may reject tasks, leaving fewer items
    after: "ScriptRun | None" = None  # the run whose checkpoint it starts from
    process: ForkedRun | None = None
    status: str = "not run"
    problems: list[str] = field(default_factory=list)
    row: dict = field(default_factory=dict)

    @property
    def settled(self) -> bool:
        """Run and checked, or left out for a reason."""
        return self.status != "not run" or bool(self.problems)

    @property
    def title(self) -> str:
        return f"{self.script}.py" + (f" {self.label}" if self.label else "")

    @property
    def name(self) -> str:
        """Its run name and folder."""
        return f"{self.variant}_{self.script}" + (f"_{self.label.split('=')[1]}" if self.label else "")


def data_overrides(work: Path, sizes: Sizes) -> dict[str, list[str]]:
    """Write the generated datasets; the overrides that make the scripts read them (synthetic_fs checks its files
    against `dataset.generate`, so those are given too)."""
    from dataset import cifar100
    from dataset.fewshot.synthetic import ensure_synthetic_fewshot

    hier = work / "data" / "hierarchy" / "cifar-100-python"
    cifar100.write_synthetic(hier, sizes.maxl_per_class, MAXL_TEST_PER_CLASS, 32, seed=0)
    fewshot = work / "data" / "fewshot"
    classes = {"train": sizes.steps, "val": EVAL_CLASSES, "test": EVAL_CLASSES}
    ensure_synthetic_fewshot(fewshot, classes, sizes.images_per_class, sizes.image_size, seed=0)
    return {"maxl": ["dataset=synthetic_hier", f"dataset.path={hier}"],
            "mela": ["dataset=synthetic_fs", f"dataset.path={fewshot}",
                     *(f"dataset.generate.classes.{split}={n}" for split, n in classes.items()),
                     f"dataset.generate.images_per_class={sizes.images_per_class}",
                     f"dataset.generate.image_size={sizes.image_size}", "dataset.generate.seed=0"]}


def plan(variants: list[str], device: str, sizes: Sizes, data: dict, num_workers: int | None) -> list[ScriptRun]:
    """Every run, in the order they are started: the chain first (the others wait for its checkpoints), then the
    compiled runs (the longest). The MeLa steps start from checkpoints of the first variant asked (fp32 by
    default): its learn_meta_repr -> learn_labeler -> fine_tune -> meta_eval is the chain, and every other
    variant's learn_labeler and fine_tune start from that chain's checkpoints, so that no chain of compiled runs
    lengthens the check."""
    runs, chain = [], {}
    for variant in variants:
        setting = VARIANTS[variant]
        common = [f"device={device}", f"precision={setting['precision']}",
                  f"compile={str(setting['compile']).lower()}", f"model.width_mult={sizes.width}", "progress=false",
                  *([f"num_workers={num_workers}"] if num_workers is not None else [])]
        mela = [*common, *data["mela"], f"test_db_size={sizes.eval_tasks}"]
        train = [*mela, "epochs=1"]
        tasks = [f"train_db_size={sizes.steps}", "no_replacement=false", "tasks_per_step=1"]
        # std_factor=10: the labeler keeps its centroids on these few generated images (pruning is not what is
        # checked here), whatever the augmentation's draws
        labeler = [f"K={sizes.labeler_k}", f"train_db_size={sizes.labeler_tasks}", "no_replacement=false",
                   f"batch_size={sizes.labeler_batch}", "std_factor=10"]
        runs += [ScriptRun("learn_meta_repr", variant, "", [*train, *tasks], sizes.steps),
                 ScriptRun("learn_labeler", variant, "", [*train, *labeler], sizes.steps, fewer_allowed=True),
                 ScriptRun("fine_tune", variant, "", [*train, *tasks], sizes.steps),
                 ScriptRun("sup_baseline", variant, "", [*train, f"batch_size={sizes.batch_size}"], sizes.steps)]
        if variant == variants[0]:
            runs.append(ScriptRun("meta_eval", variant, "", [*mela, "split=test"], None))
            chain = {run.script: run for run in runs[-5:] if run.script in (*STARTS_FROM, "learn_meta_repr")}
        for method in MAXL_METHODS:
            runs.append(ScriptRun("maxl_train", variant, f"method={method}",
                                  [*common, *data["maxl"], f"method={method}", "epochs=1",
                                   f"batch_size={sizes.maxl_batch}"], sizes.steps * (2 if method == "maxl" else 1)))
    for run in runs:
        run.overrides.append(f"name={run.name}")
        if run.script in STARTS_FROM:
            key, source = STARTS_FROM[run.script]
            run.after = chain[source]
            run.overrides.append(f"{key}={run.after.name}")
    in_chain = set(map(id, chain.values()))
    return sorted(runs, key=lambda run: 0 if id(run) in in_chain else 1 if VARIANTS[run.variant]["compile"] else 2)


STARTS_FROM = {"learn_labeler": ("pretrained_labeler", "learn_meta_repr"),
               "fine_tune": ("pretrained_model", "learn_labeler"), "meta_eval": ("pretrained_model", "fine_tune")}


def not_applicable(variants: list[str]) -> list[ScriptRun]:
    """meta_eval's rows in the variants it is not run in."""
    rows = []
    for variant in variants[1:]:
        run = ScriptRun("meta_eval", variant, "", [], None, status="n/a")
        run.problems.append("trains nothing and extracts features in float32 without autocast: precision and compile "
                            "do not apply")
        rows.append(run)
    return rows


# ---- the scripts ---------------------------------------------------------------------------------------------------

def run_scripts(runs: list[ScriptRun], device: str, jobs: int, work: Path, env: dict, scale: float,
                budget_s: float) -> None:
    """Up to `jobs` runs at a time, in the order given, each once the run it starts from passed; none starts after
    `budget_s`, and those still running then are stopped."""
    deadline = time.perf_counter() + budget_s
    waiting, running = list(runs), []
    while waiting or running:
        for run in list(waiting):
            if len(running) >= jobs or time.perf_counter() > deadline:
                break
            if run.after is not None and run.after.status != "pass":
                if run.after.settled:
                    run.problems.append(f"not run: it starts from {run.after.title} {run.after.variant}, which "
                                        f"did not pass")
                    waiting.remove(run)
                continue
            timeout = BUDGET["compiled_run" if VARIANTS[run.variant]["compile"] else "run"] * scale
            folder = work / "runs" / run.name
            run.overrides.append(f"hydra.run.dir={folder / 'run'}")
            run.process = ForkedRun(ROOT / f"{run.script}.py", run.overrides, folder, env, timeout)
            run.process.start()
            waiting.remove(run)
            running.append(run)
        for run in [run for run in running if run.process.poll(deadline)]:
            running.remove(run)
            check_run(run, device)
            print(f"gpu_check: {run.title} {run.variant}: {run.status} ({run.process.wall_s} s)"
                  + (f": {'; '.join(run.problems)}" if run.problems else ""), file=sys.stderr, flush=True)
        if time.perf_counter() > deadline and not running:
            for run in waiting:
                run.problems.append("not run: over the scripts' budget")
            waiting.clear()
        time.sleep(0.2)


def run_log(run_dir: Path) -> str:
    logs = sorted(run_dir.glob("*.log"))
    return logs[0].read_text() if logs else ""


def device_evidence(log_text: str, device: str, precision: str, compiled: bool) -> tuple[str | None, list[str]]:
    """(the device the run's log names, what does not match the asked device, precision and compile)."""
    lines = [m for m in map(DEVICE_LINE.search, log_text.splitlines()) if m]
    if not lines:
        return None, ["its log has no `device: ...` line"]
    used, used_precision, used_compile = lines[-1].group(1), lines[-1].group(2), bool(lines[-1].group(3))
    problems = []
    if used.split(":")[0] != device:
        problems.append(f"ran on {used}, not {device}")
    if used_precision != precision:
        problems.append(f"ran in {used_precision}, not {precision}")
    if used_compile != compiled:
        problems.append("compiled, though compile=false" if used_compile else "not compiled, though compile=true")
    return used, problems


def epoch_rows(run_dir: Path) -> list[dict]:
    """The run's metrics.csv rows, one per epoch."""
    if not (run_dir / "metrics.csv").is_file():
        return []
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def steps_taken(script: str, run_dir: Path, log_text: str) -> int | None:
    """Optimiser steps from the run's records: epochs in metrics.csv x steps per epoch (items in its log, batch in
    its config.yaml; MAXL's label-learning methods add a meta pass per epoch)."""
    from omegaconf import OmegaConf

    kind = "maxl_train" if script == "maxl_train" else "meta" if script in ("learn_meta_repr", "fine_tune") \
        else "supervised"
    found = [m for m in map(TRAINED[kind].search, log_text.splitlines()) if m]
    epochs = len(epoch_rows(run_dir))
    if not found or not epochs:
        return None
    cfg = OmegaConf.load(run_dir / "config.yaml")
    per_step = cfg.tasks_per_step if kind == "meta" else cfg.batch_size
    passes = 2 if kind == "maxl_train" and cfg.method in ("maxl", "maxl_first_order") else 1
    return epochs * passes * math.ceil(int(found[-1].group(1)) / per_step)


def exit_problem(process: ForkedRun) -> str:
    """Its exit status, why it was stopped if it was, and the last line it printed."""
    tail = [line for line in process.output.read_text(errors="replace").splitlines() if line.strip()][-1:]
    return (f"exit status {process.exit_code}" + (f", stopped {process.stopped}" if process.stopped else "")
            + (f": {tail[0][:300]}" if tail else ""))


def check_run(run: ScriptRun, device: str) -> None:
    process, setting = run.process, VARIANTS[run.variant]
    run_dir = process.folder / "run"
    log_text = run_log(run_dir)
    used, problems = device_evidence(log_text, device, setting["precision"], setting["compile"])
    peak = process.peak_gpu_mb()
    steps = epoch_s = None
    if process.exit_code != 0:  # the cause, and a device it ran on that was not the one asked
        problems = [exit_problem(process), *(problems if used else [])]
    else:
        if device == "cuda" and not peak:
            problems.append("no CUDA memory was allocated")
        if run.script == "meta_eval":
            if not (run_dir / "results.json").is_file():
                problems.append("no results.json")
        else:
            steps = steps_taken(run.script, run_dir, log_text)
            if steps is None or steps < 1:
                problems.append("no training step recorded")
            elif run.expected_steps is not None and (steps > run.expected_steps if run.fewer_allowed
                                                     else steps != run.expected_steps):
                problems.append(f"{steps} steps, {run.expected_steps} asked")
            epoch_s = round(sum(float(row["time_s"]) for row in epoch_rows(run_dir)), 2)
    run.problems = problems
    run.status = "fail" if problems else "pass"
    run.row = {"device": used, "steps": steps, "expected_steps": run.expected_steps, "wall_s": process.wall_s,
               "epoch_s": epoch_s, "peak_gpu_mb": peak, "exit_code": process.exit_code}


# ---- the benches ---------------------------------------------------------------------------------------------------

def bench_options(path: Path) -> set[str]:
    """The options a bench's argparse declares (read from its source, so a bench that gains --device is run on the
    device without a change here)."""
    options = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            options |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return options


@dataclass
class BenchRun:
    bench: str
    argv: list[str]
    has_device: bool
    precision: str | None
    process: ForkedRun | None = None
    rows: list[dict] = field(default_factory=list)
    status: str = "not run"
    problems: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"{self.bench}.py" + (f" {self.precision}" if self.precision else "")


def bench_plan(args, precisions: list[str]) -> list[BenchRun]:
    runs = []
    for name, argv in (("bench_maxl", ["--methods", "single,maxl", "--width", str(args.width), "--batch-size",
                                       str(args.maxl_batch), "--iters", str(args.bench_iters)]),
                       ("bench_mela", ["--only", "meta_step,supervised", "--width", str(args.width), "--image-size",
                                       str(args.image_size), "--iters", str(args.bench_iters)])):
        has_device = "--device" in bench_options(ROOT / "bench" / f"{name}.py")
        for precision in precisions:
            runs.append(BenchRun(name, [*argv, *(["--device", args.device] if has_device else []), "--precision",
                                        precision], has_device, precision))
    options = bench_options(ROOT / "bench" / "bench_data.py")
    argv = [*(["--seconds", str(args.bench_seconds)] if "--seconds" in options else []),
            *(["--images-per-class", str(IMAGES_PER_TASK_CLASS)] if "--images-per-class" in options else []),
            *(["--num-workers", str(args.num_workers)] if args.num_workers is not None
              and "--num-workers" in options else []),
            *(["--device", args.device] if "--device" in options else [])]
    runs.append(BenchRun("bench_data", argv, "--device" in options, None))
    return runs


def run_bench(run: BenchRun, work: Path, env: dict, scale: float, device: str) -> None:
    folder = work / "benches" / f"{run.bench}_{run.precision or 'default'}"
    run.process = ForkedRun(ROOT / "bench" / f"{run.bench}.py", run.argv, folder, env, BUDGET[run.bench] * scale)
    run.process.run()
    text = run.process.output.read_text(errors="replace")
    run.rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    if run.process.exit_code != 0:
        run.problems.append(exit_problem(run.process))
    elif not run.rows:
        run.problems.append("no JSON line")
    for row in run.rows:
        if "meta_s" not in row and "seconds_per_step" in row and "images_per_step" in row:
            row["images_per_s"] = round(row["images_per_step"] / row["seconds_per_step"], 1)
        if run.has_device and "device" in row and str(row["device"]).split(":")[0] != device:
            run.problems.append(f"{row.get('method') or row.get('bench')} ran on {row['device']}, not {device}")
    run.status = "fail" if run.problems else "pass"
    print(f"gpu_check: {run.title}: {run.status} ({run.process.wall_s} s)"
          + (f": {'; '.join(run.problems)}" if run.problems else ""), file=sys.stderr, flush=True)


# ---- the report ----------------------------------------------------------------------------------------------------

def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def bench_figures(row: dict) -> str:
    keys = [k for k in FIGURES if row.get(k) is not None] + \
        [k for k in row if ("_over_" in k or "ratio" in k or k.endswith("_ms")) and k not in FIGURES]
    return ", ".join(f"{k} {cell(row[k])}" for k in keys)


def bench_label(row: dict) -> str:
    name = row.get("method") or row.get("bench") or "ratios"
    return name + (f" augment={str(row['augment']).lower()}" if "augment" in row else "")


def markdown(report: dict) -> str:
    sizes = report["sizes"]
    lines = [f"# gpu_check: {report['device_name']} ({report['device']}), torch {report['torch']}", "",
             f"{report['date']}; {report['passed_checks']} of {report['checks']} checks passed; "
             f"{report['seconds']:.0f} s in all.", "",
             f"## Scripts: one epoch of {sizes['steps']} steps (MAXL: x2 for maxl's meta steps), width "
             f"{sizes['width']}, MeLa {sizes['image_size']}x{sizes['image_size']}, up to {report['jobs']} runs at a "
             f"time", "",
             "| script | variant | status | steps | wall s | epoch s | peak GPU MB | device (run's log) |",
             "|---|---|---|---|---|---|---|---|"]
    for run in report["scripts"]:
        lines.append(f"| {run['title']} | {run['variant']} | {run['status']} | {cell(run.get('steps'))} | "
                     f"{cell(run.get('wall_s'))} | {cell(run.get('epoch_s'))} | {cell(run.get('peak_gpu_mb'))} | "
                     f"{cell(run.get('device'))} |")
    lines += ["", "wall s: the run's process (with the others running beside it); epoch s: its epoch in "
                  "metrics.csv, validation included. Step times and images/s: the benches below, each run alone.",
              "", "## Benches", "", "| bench | row | precision | device | status | figures |",
              "|---|---|---|---|---|---|"]
    for bench in report["benches"]:
        device = None if bench["has_device"] else "cpu (no --device option)"
        for row in bench["rows"] or [{}]:
            lines.append(f"| {bench['bench']}.py | {bench_label(row) if row else ''} | "
                         f"{row.get('precision', bench['precision']) or ''} | {device or row.get('device', '')} | "
                         f"{bench['status']} | {bench_figures(row)} |")
    problems = [f"- {run['title']} {run['variant']}: {'; '.join(run['problems'])}" for run in report["scripts"]
                if run["status"] == "fail" or run["status"] == "not run"] + \
        [f"- {bench['title']}: {'; '.join(bench['problems'])}"
         for bench in report["benches"] if bench["status"] != "pass"]
    if problems:
        lines += ["", "## Failed", "", *problems]
    return "\n".join(lines) + "\n"


# ---- main ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=Path("logs/gpu_check"), help="gpu_check.md and .json go here")
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps per run (at least 5: the MeLa "
                                                              "data has one train class per step, tasks are 5-way)")
    parser.add_argument("--width", type=float, default=1.0, help="model.width_mult of every run and bench")
    parser.add_argument("--image-size", type=int, default=84, help="the MeLa images' side (MAXL's are 32)")
    parser.add_argument("--batch-size", type=int, default=128, help="supervised batch (sup_baseline, "
                        "learn_labeler): a multiple of 4 and at least 80 (a class's images in 4 turns)")
    parser.add_argument("--maxl-batch", type=int, default=100, help="maxl_train.py's and bench_maxl.py's batch "
                        "(--steps x it: a multiple of the data's 100 classes)")
    parser.add_argument("--eval-tasks", type=int, default=20, help="few-shot tasks of each validation and of "
                                                                   "meta_eval (test_db_size)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of "
                        + ",".join(VARIANTS))
    parser.add_argument("--jobs", type=int, default=5, help="script runs at a time")
    parser.add_argument("--num-workers", type=int, default=None, help="the runs' and bench_data's num_workers "
                                                                      "(default: theirs)")
    parser.add_argument("--bench-iters", type=int, default=3, help="timed steps per bench figure")
    parser.add_argument("--bench-seconds", type=float, default=2.0, help="bench_data.py's measuring time per figure")
    parser.add_argument("--time-scale", type=float, default=None, help="multiplies every time budget (default: 1 "
                                                                       "on cuda, 4 on cpu)")
    parser.add_argument("--keep", action="store_true", help="keep the workspace (runs, checkpoints, logs) even "
                                                            "when every check passed")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    for problem in (
            [f"--variants: unknown {v}: choose from {', '.join(VARIANTS)}" for v in variants if v not in VARIANTS]
            + ([f"--steps {args.steps}: give 5 or more (one MeLa train class per step, 5-way tasks)"]
               if args.steps < N_WAYS else [])
            + ([f"--batch-size {args.batch_size}: give a multiple of 4, at least {ROTATIONS * IMAGES_PER_TASK_CLASS}"]
               if args.batch_size % ROTATIONS or args.batch_size < ROTATIONS * IMAGES_PER_TASK_CLASS else [])
            + ([f"--maxl-batch {args.maxl_batch}: --steps x --maxl-batch must be a multiple of {MAXL_CLASSES} (the "
                 f"generated MAXL data has as many images in each of its {MAXL_CLASSES} classes)"]
               if args.maxl_batch < 1 or args.steps * args.maxl_batch % MAXL_CLASSES else [])
            + ([f"--jobs {args.jobs}: give 1 or more"] if args.jobs < 1 else [])):
        parser.exit(1, f"error: {problem}\n")
    args.variants = [v for v in VARIANTS if v in variants]  # the first one asked of fp32, bf16, compile: the chain
    if args.time_scale is None:
        args.time_scale = 1.0 if args.device == "cuda" else 4.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="workspace_", dir=args.out)).absolute()
    for module in PRELOAD:
        importlib.import_module(module)
    # One thread here: a process that has run OpenMP on several threads cannot be forked safely (its children hang
    # in libgomp); each run sets its own threads.
    sys.modules["torch"].set_num_threads(1)
    info = device_info(work / "device", BUDGET["setup"] * args.time_scale)
    if args.device == "cuda" and not info["cuda"]:
        print("error: --device cuda: no CUDA GPU is visible; run it on a GPU machine, or with --device cpu",
              file=sys.stderr)
        shutil.rmtree(work)
        return 1
    sizes = Sizes(args.steps, args.width, args.image_size, args.batch_size, args.maxl_batch, args.eval_tasks)
    env = {"WORKSPACE": str(work / "workspace")}
    scripts = plan(args.variants, args.device, sizes, data_overrides(work, sizes), args.num_workers)
    run_scripts(scripts, args.device, args.jobs, work, env, args.time_scale, BUDGET["scripts"] * args.time_scale)
    scripts += not_applicable(args.variants)
    precisions = list(dict.fromkeys(VARIANTS[v]["precision"] for v in args.variants))
    benches = bench_plan(args, precisions)
    for bench in benches:
        run_bench(bench, work, env, args.time_scale, args.device)
    order = {name: i for i, name in enumerate(["maxl_train", "learn_meta_repr", "learn_labeler", "fine_tune",
                                               "sup_baseline", "meta_eval"])}
    methods = [f"method={m}" for m in MAXL_METHODS]
    scripts.sort(key=lambda r: (order[r.script], methods.index(r.label) if r.label else 0,
                                list(VARIANTS).index(r.variant)))
    checked = [r for r in scripts if r.status != "n/a"] + benches
    passed = sum(r.status == "pass" for r in checked)
    report = {
        "device": args.device, "device_name": info["name"], "torch": info["torch"],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "sizes": vars(sizes), "jobs": args.jobs, "variants": {v: VARIANTS[v] for v in args.variants},
        "budget_s": {k: v * args.time_scale for k, v in BUDGET.items()},
        "scripts": [{"script": r.script, "title": r.title, "label": r.label, "variant": r.variant,
                     "status": r.status, "problems": r.problems, "command": r.overrides, **r.row} for r in scripts],
        "benches": [{"bench": b.bench, "title": b.title, "argv": b.argv, "has_device": b.has_device,
                     "precision": b.precision, "status": b.status, "problems": b.problems, "rows": b.rows,
                     "wall_s": b.process.wall_s if b.process else None} for b in benches],
        "checks": len(checked), "passed_checks": passed, "passed": passed == len(checked),
        "seconds": round(time.perf_counter() - began, 1)}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (args.out / "gpu_check.md").write_text(text)
    print(text, end="")
    if report["passed"] and not args.keep:
        shutil.rmtree(work)
    else:
        print(f"runs, logs and checkpoints: {work}", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
