"""The benchmarks keep working: their JSON rows, 1- vs 2-process runs, and the checks they carry (figures are not
asserted: speed belongs to the benches themselves)."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def bench_rows(script: str, *args: str) -> list[dict]:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_bench_mela_reports_one_and_two_processes_through_the_engine():
    rows = bench_rows("bench_mela.py", "--quick", "--only", "supervised,meta_step", "--nproc", "1,2",
                      "--tasks-per-step", "2")
    for bench, rate in (("supervised", "images_per_s"), ("meta_step", "tasks_per_s")):
        measured = {row["nproc"]: row for row in rows if row["bench"] == bench}
        assert sorted(measured) == [1, 2]
        for row in measured.values():
            assert row[rate] > 0 and row["precision"] == "fp32" and row["device"] == "cpu"
        assert measured[2]["threads"] == 1  # torchrun's one thread per rank
    assert {row["batch_size"] for row in rows if row["bench"] == "supervised"} == {16}  # the global batch


def test_bench_mela_rejects_a_global_batch_the_processes_cannot_share():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_mela.py"), "--quick", "--only",
                             "meta_step", "--nproc", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--tasks-per-step 1 is not divisible by 2 processes" in result.stderr


def test_bench_maxl_rows_and_ratio_to_the_reference_procedure():
    rows = bench_rows("bench_maxl.py", "--width", "0.125", "--batch-size", "8", "--iters", "1",
                      "--methods", "single,maxl,reference")
    by_method = {row["method"]: row for row in rows if "method" in row}
    assert sorted(by_method) == ["maxl", "reference", "single"]
    assert by_method["single"]["meta_s"] is None and by_method["maxl"]["meta_s"] > 0
    ratio = next(row for row in rows if "maxl_pair_over_reference" in row)
    assert ratio["maxl_pair_over_reference"] == round(by_method["maxl"]["pair_s"] / by_method["reference"]["pair_s"], 3)


def test_bench_data_compares_the_per_image_and_batched_augmentation():
    rows = bench_rows("bench_data.py", "--num-workers", "0", "--seconds", "0.05", "--images-per-class", "20",
                      "--repeats", "1")
    compared = {row["pipeline"]: row for row in rows if row["bench"] == "augment_per_core"}
    assert {name: row["image_size"] for name, row in compared.items()} == {"mela": 84, "maxl": 32}
    for row in compared.values():
        assert row["per_image_images_per_s"] > 0 and row["batched_images_per_s"] > 0
        assert abs(row["ratio"] - row["batched_images_per_s"] / row["per_image_images_per_s"]) < 0.06
    profile = next(row for row in rows if row["bench"] == "profile")
    assert all(profile[f"{stage}_ms"] > 0 for stage in ("gather", "crop_flip", "float", "jitter", "normalise"))
