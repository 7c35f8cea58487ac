"""`make gpu_check` (bench/gpu_check.py) on the CPU at toy sizes, so that it cannot rot where no GPU is: every script
and bench runs and is checked, and the tables say what ran, where and for how many steps."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

STEPS = 5
TOY = ["--device", "cpu", "--steps", str(STEPS), "--width", "0.125", "--image-size", "32", "--batch-size", "80",
       "--maxl-batch", "20", "--eval-tasks", "5", "--variants", "fp32", "--jobs", "2", "--num-workers", "0",
       "--bench-iters", "1", "--bench-seconds", "0.2"]


@pytest.fixture(scope="module")
def gpu_check():
    """bench/gpu_check.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def test_every_script_and_bench_runs_and_is_checked_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *TOY, "--out", str(out)],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and report["device_name"] == "cpu" and report["passed"]
    # the steps each run's own records show: one epoch of STEPS batches; MAXL adds a meta step to each
    exact = {"maxl_train.py method=single": STEPS, "maxl_train.py method=human": STEPS,
             "maxl_train.py method=maxl": 2 * STEPS, "learn_meta_repr.py": STEPS, "fine_tune.py": STEPS,
             "sup_baseline.py": STEPS}
    rows = {row["title"]: row for row in report["scripts"]}
    assert len(rows) == len(report["scripts"]) == 8
    assert set(rows) == {*exact, "learn_labeler.py", "meta_eval.py"}
    for title, row in rows.items():
        assert (row["variant"], row["status"], row["exit_code"], row["problems"]) == ("fp32", "pass", 0, []), title
        assert row["device"] == "cpu" and row["peak_gpu_mb"] is None and row["wall_s"] > 0
        assert row["steps"] == exact.get(title, row["steps"]), title
    assert 1 <= rows["learn_labeler.py"]["steps"] <= STEPS  # its labeler may reject tasks, never add steps
    assert rows["meta_eval.py"]["steps"] is None  # it trains nothing

    benches = {bench["bench"]: bench for bench in report["benches"]}
    assert set(benches) == {"bench_maxl", "bench_mela", "bench_data"}
    assert all(bench["status"] == "pass" for bench in benches.values())
    maxl = {row["method"]: row for row in benches["bench_maxl"]["rows"]}
    assert set(maxl) == {"single", "maxl"} and maxl["maxl"]["meta_s"] > 0 and maxl["single"]["meta_s"] is None
    mela = {row["bench"]: row for row in benches["bench_mela"]["rows"]}
    assert set(mela) == {"meta_step", "supervised"}
    assert mela["meta_step"]["images_per_s"] == round(mela["meta_step"]["images_per_step"]
                                                      / mela["meta_step"]["seconds_per_step"], 1)
    assert all(row["device"] == "cpu" and row["precision"] == "fp32" for row in [*maxl.values(), *mela.values()])
    assert benches["bench_data"]["rows"]

    markdown = (out / "gpu_check.md").read_text()
    assert result.stdout == markdown  # printed as written
    for title, steps in exact.items():
        assert f"| {title} | fp32 | pass | {steps} |" in markdown
    assert "| meta_eval.py | fp32 | pass |  |" in markdown
    assert "## Failed" not in markdown
    assert not list(out.glob("workspace_*"))  # removed: every check passed


def test_a_run_elsewhere_than_asked_fails_its_check(gpu_check):
    check = gpu_check.device_evidence
    log = "2026-01-01 00:00:00,000 | device: cpu, precision fp32\n"
    assert check(log, "cpu", "fp32", False) == ("cpu", [])
    assert check(log, "cuda", "bf16", True) == ("cpu", ["ran on cpu, not cuda", "ran in fp32, not bf16",
                                                       "not compiled, though compile=true"])
    assert check("| device: cuda:0, precision bf16, compiled\n", "cuda", "bf16", True) == ("cuda:0", [])
    assert check("nothing about the device\n", "cuda", "fp32", False) == (None, ["its log has no `device: ...` line"])


@pytest.mark.parametrize("option, message", [
    (["--steps", "3"], "error: --steps 3: give 5 or more"),
    (["--batch-size", "90"], "error: --batch-size 90: give a multiple of 4, at least 80"),
    (["--variants", "fp16"], "error: --variants: unknown fp16"),
])
def test_bad_options_are_one_line(option, message, capsys, gpu_check):
    with pytest.raises(SystemExit) as stop:
        gpu_check.parse_args(option)
    assert stop.value.code == 1
    assert capsys.readouterr().err.startswith(message)


def test_every_variant_trains_every_script_and_starts_from_the_fp32_chain(gpu_check):
    sizes = gpu_check.Sizes(steps=10, width=1.0, image_size=84, batch_size=128, maxl_batch=100, eval_tasks=20)
    runs = gpu_check.plan(["fp32", "bf16", "compile"], "cuda", sizes, {"maxl": [], "mela": []}, None)
    by_name = {run.name: run for run in runs}
    assert len(by_name) == len(runs) == 22  # 7 training runs per variant and one meta_eval
    assert [run.name for run in runs[:4]] == ["fp32_learn_meta_repr", "fp32_learn_labeler", "fp32_fine_tune",
                                              "fp32_meta_eval"]  # the chain first: the other variants wait for it
    for variant, precision, compiled in (("fp32", "fp32", "false"), ("bf16", "bf16", "false"),
                                         ("compile", "bf16", "true")):
        labeler, fine_tune = by_name[f"{variant}_learn_labeler"], by_name[f"{variant}_fine_tune"]
        assert labeler.after is by_name["fp32_learn_meta_repr"] and fine_tune.after is by_name["fp32_learn_labeler"]
        assert "pretrained_labeler=fp32_learn_meta_repr" in labeler.overrides
        assert "pretrained_model=fp32_learn_labeler" in fine_tune.overrides
        for run in runs:
            if run.variant == variant:
                assert {"device=cuda", f"precision={precision}", f"compile={compiled}", "model.width_mult=1.0",
                        f"name={run.name}"} <= set(run.overrides)
        assert by_name[f"{variant}_maxl_train_maxl"].expected_steps == 20  # a meta step after each of the 10
    assert by_name["fp32_meta_eval"].after is by_name["fp32_fine_tune"]
    assert not any(run.script == "meta_eval" and run.variant != "fp32" for run in runs)
    # learn_labeler takes every item of its tasks (5-way, 20 images a class, 4 turns) in at most 10 steps
    assert sizes.labeler_batch * 10 >= sizes.labeler_tasks * 5 * 20 * 4 > sizes.labeler_batch * 9


def test_make_gpu_check_passes_its_arguments_on():
    dry = subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed", "gpu_check",
                          "GPU_CHECK_ARGS=--device cpu --steps 5"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert dry.strip() == ".venv/bin/python bench/gpu_check.py --device cpu --steps 5"
