"""bench/bench_labeler.py keeps working: its rows, and the step estimate made from them (figures are not asserted)."""
import importlib.util
import json

from conftest import ROOT


def test_bench_labeler_rows_and_the_labelers_share_of_the_step(capsys):
    spec = importlib.util.spec_from_file_location("bench_labeler", ROOT / "bench" / "bench_labeler.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--scale", "mini"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["bench"] for row in rows] == ["resnet12", "labeler", "step"]
    rates, labeler, step = rows
    assert rates["features_images_per_s"] > 0 and rates["train_images_per_s"] > 0
    assert labeler["tasks"] > 0 and labeler["passes"] >= 1 and labeler["final_centroids"] >= 5
    assert labeler["labeler_s"] >= labeler["cluster_s"] > 0
    training = 50 * 4 * labeler["images"] / rates["train_images_per_s"]
    assert step["estimated"] is True and step["training_s_estimate"] == round(training)
    total = labeler["labeler_s"] + labeler["images"] / rates["features_images_per_s"] + training
    assert step["labeler_share"] == float(f"{labeler['labeler_s'] / total:.2g}")
