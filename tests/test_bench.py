"""The benchmarks keep working: their JSON rows, 1- vs 2-process runs, and the checks they carry (figures are not
asserted: speed belongs to the benches themselves). A bench's main runs in the test's process (the processes it
starts itself stay processes); a refused input's exit status, and bench_commits (two trees' modules), in one of
its own."""
import importlib
import json
import os
import subprocess
import sys

import torch
from conftest import ROOT


def bench_output(script: str, *args: str, capsys) -> str:
    """What `python bench/SCRIPT args` prints, run in this process."""
    threads = torch.get_num_threads()
    try:
        importlib.import_module(f"bench.{script.removesuffix('.py')}").main(list(args))
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


def bench_rows(script: str, *args: str, capsys) -> list[dict]:
    return [json.loads(line) for line in bench_output(script, *args, capsys=capsys).splitlines()]


def test_bench_mela_reports_one_and_two_processes_through_the_engine(capsys):
    rows = bench_rows("bench_mela.py", "--quick", "--only", "supervised,meta_step", "--nproc", "1,2",
                      "--tasks-per-step", "2", capsys=capsys)
    for bench, rate in (("supervised", "images_per_s"), ("meta_step", "tasks_per_s")):
        measured = {row["nproc"]: row for row in rows if row["bench"] == bench}
        assert sorted(measured) == [1, 2]
        for row in measured.values():
            assert row[rate] > 0 and row["precision"] == "fp32" and row["device"] == "cpu"
        # torchrun gives each rank one thread, unless OMP_NUM_THREADS says otherwise
        assert measured[2]["threads"] == int(os.environ.get("OMP_NUM_THREADS", 1))
    assert {row["batch_size"] for row in rows if row["bench"] == "supervised"} == {16}  # the global batch


def test_bench_mela_rejects_a_global_batch_the_processes_cannot_share():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_mela.py"), "--quick", "--only",
                             "meta_step", "--nproc", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--tasks-per-step 1 is not divisible by 2 processes" in result.stderr


def test_bench_maxl_rows_and_ratio_to_the_reference_procedure(capsys):
    """(method=single's row, without a meta step, is checked by test_gpu_check's run of this bench.)"""
    rows = bench_rows("bench_maxl.py", "--width", "0.125", "--batch-size", "8", "--iters", "1",
                      "--methods", "maxl,reference", capsys=capsys)
    by_method = {row["method"]: row for row in rows if "method" in row}
    assert sorted(by_method) == ["maxl", "reference"]
    assert by_method["maxl"]["meta_s"] > 0 and by_method["reference"]["meta_s"] > 0
    ratio = next(row for row in rows if "maxl_pair_over_reference" in row)
    assert ratio["maxl_pair_over_reference"] == round(by_method["maxl"]["pair_s"] / by_method["reference"]["pair_s"], 3)


def test_baseline_comparison_flags_slowdowns_beyond_the_threshold():
    from bench.baseline import better, compare

    old = {"benches": {"bench_maxl": [
        {"method": "maxl", "nproc": 1, "phase1_s": 2.0, "meta_s": 4.0, "images_per_s": 100.0, "batch_size": 100},
        {"nproc": 1, "maxl_pair_over_reference": 0.5}]}}
    new = [{"method": "maxl", "nproc": 1, "phase1_s": 2.1, "meta_s": 5.0, "images_per_s": 80.0, "batch_size": 50},
           {"nproc": 1, "maxl_pair_over_reference": 0.4}, {"method": "single", "nproc": 1, "phase1_s": 1.0}]
    assert [better(name) for name in ("seconds_per_step", "tasks_per_s_5shot", "images_per_step", "peak_mem_mb")] \
        == ["lower", "higher", None, None]
    assert compare("bench_maxl", new, old, slower_than=0.10) == [
        "bench_maxl method=maxl nproc=1 phase1_s: 2.1 (baseline 2) x1.050",  # within 10%: not flagged
        "bench_maxl method=maxl nproc=1 meta_s: 5 (baseline 4) x1.250  SLOWER",
        "bench_maxl method=maxl nproc=1 images_per_s: 80 (baseline 100) x0.800  SLOWER",  # a rate: lower is worse
        "bench_maxl method=maxl nproc=1: measured with other settings than the baseline (batch_size=50 vs 100)",
        "bench_maxl nproc=1 maxl_pair_over_reference: 0.4 (baseline 0.5) x0.800",
        "bench_maxl method=single nproc=1: not in the baseline"]


def test_bench_saves_its_figures_and_compares_them_with_a_baseline_file(tmp_path, capsys):
    """--save writes the bench's section; --baseline prints each figure against a hand-written file's."""
    hand_written = tmp_path / "baseline.json"
    hand_written.write_text(json.dumps({"machine": "elsewhere", "benches": {"bench_mela": [
        {"bench": "meta_eval", "nproc": 1, "tasks_per_s_1shot": 1e9, "tasks_per_s_5shot": 1e-9}]}}))
    saved = tmp_path / "figures.json"
    output = bench_output("bench_mela.py", "--quick", "--only", "meta_eval", "--baseline", str(hand_written),
                          "--save", str(saved), capsys=capsys)
    row = json.loads(output.splitlines()[0])
    lines = {line.split(":")[0]: line for line in output.splitlines()[1:]}
    assert lines["# note"].startswith("# note: the baseline was written on elsewhere")
    one_shot = lines["bench_mela bench=meta_eval nproc=1 tasks_per_s_1shot"]
    assert one_shot.endswith(f"{row['tasks_per_s_1shot']:g} (baseline 1e+09) "
                             f"x{row['tasks_per_s_1shot'] / 1e9:.3f}  SLOWER")
    assert not lines["bench_mela bench=meta_eval nproc=1 tasks_per_s_5shot"].endswith("SLOWER")
    assert json.loads(saved.read_text())["benches"] == {"bench_mela": [row]}


def test_a_baseline_that_is_not_a_figures_file_is_refused_before_measuring(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_mela.py"), "--quick", "--only", "meta_eval",
                             "--baseline", str(broken)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: --baseline {broken}: cannot be read as a figures file")


def test_bench_data_compares_the_per_image_and_batched_augmentation(capsys):
    rows = bench_rows("bench_data.py", "--num-workers", "0", "--seconds", "0.05", "--images-per-class", "20",
                      "--repeats", "1", capsys=capsys)
    compared = {row["pipeline"]: row for row in rows if row["bench"] == "augment_per_core"}
    assert {name: row["image_size"] for name, row in compared.items()} == {"mela": 84, "maxl": 32}
    for row in compared.values():
        assert row["per_image_images_per_s"] > 0 and row["batched_images_per_s"] > 0
        assert abs(row["ratio"] - row["batched_images_per_s"] / row["per_image_images_per_s"]) < 0.06
    profile = next(row for row in rows if row["bench"] == "profile")
    assert all(profile[f"{stage}_ms"] > 0 for stage in ("gather", "crop_flip", "float", "jitter", "normalise"))


def test_bench_commits_times_this_tree_and_a_commit_alternately_in_one_process():
    worktrees = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_commits.py"), "HEAD", "--rounds", "2",
                             "--width", "0.0625", "--batch-size", "4"], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["step"] for row in rows] == ["phase1", "meta"]
    for row in rows:
        assert row["HEAD_s"] > 0 and row["this_s"] > 0 and len(row["per_round"]) == 2
    # the commit's temporary worktree is gone again
    assert subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout == worktrees


def test_bench_commits_refuses_an_unknown_commit_in_one_line():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_commits.py"), "no-such-commit"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.startswith("error: no-such-commit: cannot be checked out") and "Traceback" not in result.stderr
