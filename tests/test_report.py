"""tools.report on run folders written here with known metrics: groups, t-intervals, paired tests, files, errors."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch
import yaml
from conftest import ROOT

from tools import report

BASE = {"seed": 0, "device": "cpu", "num_workers": 0, "workspace": "/w", "method": "single", "lr": 0.01,
        "dataset": {"name": "synthetic_hier", "path": "/w/data"}, "model": {"name": "vgg16", "width_mult": 0.125}}


def write_run(folder, script="maxl_train", summary=None, history=(), results=None, **settings):
    """A run folder as a script leaves it: config.yaml, .hydra/hydra.yaml, summary.json or results.json, metrics.csv."""
    config = json.loads(json.dumps(BASE))
    for key, value in settings.items():
        *parents, leaf = key.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"name": script}}}))
    (folder / ".hydra" / "config.yaml").write_text("not: a run\n")
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    if history:
        with open(folder / "metrics.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
    return folder


# test/acc_last5_mean per method and seed
ACC = {"single": {0: 0.70, 1: 0.74, 2: 0.71}, "maxl": {0: 0.75, 1: 0.77, 2: 0.72, 3: 0.80}}


@pytest.fixture
def sweep(tmp_path):
    """A multirun folder of two methods over seeds, with settings that must not split groups (device, workers)."""
    root = tmp_path / "logs" / "multirun" / "maxl_train" / "2025-01-01_00-00-00"
    job = 0
    for method, per_seed in ACC.items():
        for seed, acc in per_seed.items():
            curve = [{"epoch": e, "test/acc": acc - 0.1 * (2 - e), "time_s": 1.0} for e in range(3)]
            write_run(root / f"{job}_{method}_s{seed}", method=method, seed=seed, device=["cpu", "cuda"][seed % 2],
                      num_workers=seed, name=f"{method}_s{seed}",
                      summary={"epochs": 3, "test/acc_best": acc + 0.01, "test/acc_last5_mean": acc,
                               "test/acc_last": curve[-1]["test/acc"]}, history=curve)
            job += 1
    return root


def run_report(capsys, *args):
    report.main([str(a) for a in args])
    return capsys.readouterr().out


def interval(values):
    values = np.asarray(values)
    return scipy.stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=scipy.stats.sem(values))


def test_groups_differ_by_method_only_and_intervals_equal_scipy(sweep, tmp_path, capsys):
    out = run_report(capsys, sweep.parent.parent, "--json", tmp_path / "table.json", "--csv", tmp_path / "table.csv")
    document = json.loads((tmp_path / "table.json").read_text())
    assert document["settings"] == ["method"] and document["metrics"] == ["test/acc_last5_mean"]
    groups = {g["settings"]["method"]: g for g in document["groups"]}
    assert set(groups) == {"single", "maxl"}
    for method, per_seed in ACC.items():
        stats = groups[method]["metrics"]["test/acc_last5_mean"]
        values = list(per_seed.values())
        low, high = interval(values)
        assert groups[method]["n"] == stats["n"] == len(values) and groups[method]["seeds"] == list(per_seed)
        assert stats["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert (stats["low"], stats["high"]) == pytest.approx((low, high), abs=1e-12)
        assert stats["values"] == {str(s): v for s, v in per_seed.items()}
        assert f"{np.mean(values):.4f} +- {(high - low) / 2:.4f}" in out
    with open(tmp_path / "table.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == ["single", "maxl"]
    assert float(rows[1]["test/acc_last5_mean ci95"]) == pytest.approx((interval(list(ACC["maxl"].values()))[1]
                                                                       - np.mean(list(ACC["maxl"].values()))))


def test_paired_comparison_over_common_seeds_equals_ttest_rel(sweep, tmp_path, capsys):
    out = run_report(capsys, sweep, "--compare", "method=maxl", "method=single", "--json", tmp_path / "t.json")
    [comparison] = json.loads((tmp_path / "t.json").read_text())["comparisons"]
    a, b = [ACC["maxl"][s] for s in (0, 1, 2)], [ACC["single"][s] for s in (0, 1, 2)]
    diffs = np.subtract(a, b)
    assert comparison["n"] == 3 and comparison["seeds"] == [0, 1, 2] and comparison["unpaired"] == [3]
    assert comparison["mean"] == pytest.approx(diffs.mean(), abs=1e-12)
    assert (comparison["low"], comparison["high"]) == pytest.approx(interval(diffs), abs=1e-12)
    assert comparison["p"] == pytest.approx(scipy.stats.ttest_rel(a, b).pvalue, abs=1e-12)
    assert f"= {diffs.mean():+.4f}" in out and "n=3 seeds (0,1,2)" in out and "left out: 3" in out
    by_number = run_report(capsys, sweep, "--compare", "2", "1")  # groups as numbered in the table
    assert f"= {diffs.mean():+.4f}" in by_number


def test_groups_without_a_common_seed_say_so(tmp_path, capsys):
    for method, seeds in (("single", (0, 1)), ("maxl", (2, 3))):
        for seed in seeds:
            write_run(tmp_path / "runs" / f"{method}_s{seed}", method=method, seed=seed, name=f"{method}_s{seed}",
                      summary={"epochs": 3, "test/acc_last5_mean": 0.5 + seed / 10})
    out = run_report(capsys, tmp_path / "runs", "--compare", "method=maxl", "method=single", "--json",
                     tmp_path / "t.json")
    [comparison] = json.loads((tmp_path / "t.json").read_text())["comparisons"]
    assert comparison["n"] == 0 and comparison["unpaired"] == [0, 1, 2, 3]
    assert ("test/acc_last5_mean: #1 (method=maxl) - #2 (method=single): no seed has one run in each group, nothing "
            "to compare; seeds in one group only, left out: 0,1,2,3") in out
    assert "nan" not in out


def test_pairs_match_on_the_other_settings(tmp_path, capsys):
    """maxl vs single per level pair: each maxl group is paired with the single group of the same levels."""
    pairs = ((3, 20), (10, 20), (10, 100))  # neither level alone tells them apart
    for levels in pairs:
        for method, shift in (("single", 0.0), ("maxl", 0.05)):
            for seed in (0, 1):
                write_run(tmp_path / f"{levels}_{method}_{seed}", method=method, seed=seed,
                          primary_level=levels[0], auxiliary_level=levels[1],
                          summary={"test/acc_last5_mean": levels[1] / 1000 + shift + seed / 100})
    run_report(capsys, tmp_path, "--compare", "method=maxl", "method=single", "--json", tmp_path / "t.json")
    document = json.loads((tmp_path / "t.json").read_text())
    assert document["settings"] == ["method", "primary_level", "auxiliary_level"]
    comparisons = document["comparisons"]
    assert [(c["a_label"], c["b_label"]) for c in comparisons] == [
        (f"method=maxl primary_level={p} auxiliary_level={a}", f"method=single primary_level={p} auxiliary_level={a}")
        for p, a in pairs]
    assert all(c["mean"] == pytest.approx(0.05) and c["n"] == 2 for c in comparisons)


def test_settings_implied_by_others_are_left_out_of_the_label(tmp_path, capsys):
    for model, drop in (("resnet12", 0.1), ("resnet18", 0.2)):
        for seed in (0, 1):
            write_run(tmp_path / f"{model}_{seed}", script="learn_meta_repr", seed=seed, model__name=model,
                      model__drop_rate=drop, summary={"val/5shot": 0.5 + seed / 10, "val/5shot_ci95": 0.01})
    run_report(capsys, tmp_path, "--json", tmp_path / "t.json")
    document = json.loads((tmp_path / "t.json").read_text())
    assert document["settings"] == ["model.name"] and document["metrics"] == ["val/5shot"]
    assert [g["n"] for g in document["groups"]] == [2, 2]


@pytest.mark.parametrize("dataset_changes, label", [(False, ["primary_level"]), (True, ["dataset.name"])])
def test_a_choice_name_then_a_top_level_key_is_kept_over_a_key_inside_a_group(tmp_path, capsys, dataset_changes,
                                                                             label):
    for level, dataset in ((10, "cifar10"), (20, "cifar100")):
        write_run(tmp_path / f"{level}", primary_level=level, dataset__primary_level=level,
                  dataset__name=dataset if dataset_changes else "cifar100", summary={"test/acc_last5_mean": 0.5})
    run_report(capsys, tmp_path, "--json", tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["settings"] == label


def test_failed_and_unfinished_runs_are_left_out_repeated_ones_kept_with_a_note(sweep, capsys):
    failed = sweep / "9_maxl_s9"
    failed.mkdir()
    (failed / "error.txt").write_text("overrides: method=maxl seed=9\nerror: psi has 3 entries\n")
    write_run(sweep / "10_maxl_s8", method="maxl", seed=8)  # no summary yet
    write_run(sweep / "11_maxl_s0_again", method="maxl", seed=0, summary={"test/acc_last5_mean": 0.99})
    retried = write_run(sweep / "12_maxl_s5", method="maxl", seed=5, summary={"test/acc_last5_mean": 0.6})
    (retried / "error.txt").write_text("overrides: seed=5\nerror: out of memory\n")
    os.utime(retried / "error.txt", (1, 1))  # a first attempt failed, the second (in the same folder) finished
    broken = write_run(sweep / "13_maxl_s6", method="maxl", seed=6)
    (broken / "summary.json").write_text('{"test/acc')
    out = run_report(capsys, sweep, "--compare", "method=maxl", "method=single")
    assert f"note: failed job left out: {failed} (psi has 3 entries)" in out
    assert f"note: unfinished run left out (no summary.json or results.json): {sweep / '10_maxl_s8'}" in out
    assert (f"note: same settings and seed 0 in 2 run folders, all kept: {sweep / '3_maxl_s0'}, "
            f"{sweep / '11_maxl_s0_again'}") in out
    assert f"note: unreadable run left out: {broken} (JSONDecodeError" in out
    maxl = [ACC["maxl"][0], 0.99, ACC["maxl"][1], ACC["maxl"][2], ACC["maxl"][3], 0.6]  # both runs of seed 0
    assert f"{np.mean(maxl):.4f} +- {interval(maxl)[1] - np.mean(maxl):.4f}" in out
    assert "9 runs in 2 groups" in out and "0,0,1,2,3,5" in out  # the count is what the table shows
    assert "n=2 seeds (1,2)" in out and "seeds with several runs in a group, left out: 0" in out


def test_meta_eval_runs_take_the_seed_and_settings_of_the_checkpoint_they_scored(tmp_path, capsys):
    """Two steps x two seeds: grouped by the evaluated step, seeds from the checkpoints (meta_eval's own is 0)."""
    accuracies = {}
    for step, base in (("learn_meta_repr", 0.6), ("fine_tune", 0.7)):
        for seed in (3, 4):
            checkpoint = tmp_path / "saves" / f"{step}_s{seed}" / "best.pt"
            checkpoint.parent.mkdir(parents=True)
            torch.save({"script": step, "config": yaml.safe_dump({"seed": seed, "lam": 0.001}), "state": {}},
                       checkpoint)
            one, five = base + seed / 100, base + 0.1 + seed / 100
            accuracies[step, seed] = (one, five)
            write_run(tmp_path / "evals" / f"{step}_{seed}", script="meta_eval", pretrained_model=f"{step}_s{seed}",
                      results={"checkpoint": str(checkpoint), "script": step, "split": "test", "results": {
                          shots: {sub: {"mean": mean, "ci95": 0.02} for sub in ("synthetic_fs", "overall")}
                          for shots, mean in (("1", one), ("5", five))}})
    run_report(capsys, tmp_path / "evals", "--json", tmp_path / "t.json")
    document = json.loads((tmp_path / "t.json").read_text())
    assert document["settings"] == ["evaluated"] and document["metrics"] == ["test/1shot", "test/5shot"]
    for group in document["groups"]:
        step = group["settings"]["evaluated"]
        assert group["seeds"] == [3, 4]
        for column, metric in enumerate(("test/1shot", "test/5shot")):
            values = [accuracies[step, seed][column] for seed in (3, 4)]
            assert group["metrics"][metric]["mean"] == pytest.approx(np.mean(values))
            assert group["metrics"][metric]["high"] == pytest.approx(interval(values)[1])
    (tmp_path / "saves" / "fine_tune_s3" / "best.pt").unlink()
    out = run_report(capsys, tmp_path / "evals", "--metric", "test/5shot/synthetic_fs")
    assert "not readable: grouped by meta_eval's settings and seed only" in out


def test_old_use_a_metrics_column_and_the_figure_of_mean_curves(sweep, tmp_path, capsys):
    """`--metric test/acc`: a metrics.csv column (its last epoch); the figure shows the per-epoch means."""
    out = run_report(capsys, sweep, "--metric", "test/acc", "--plot", tmp_path / "fig" / "acc.png")
    single = [ACC["single"][s] for s in (0, 1, 2)]  # the last epoch's test/acc equals the summary's value
    assert f"{np.mean(single):.4f} +- {interval(single)[1] - np.mean(single):.4f}" in out
    assert (tmp_path / "fig" / "acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs, _ = report.collect([str(sweep)])
    groups, _ = report.make_groups(runs, report.label_keys(runs))
    fig = report.figure(groups, "test/acc")
    ax = fig.axes[0]
    assert all(float(t).is_integer() for t in ax.get_xticks())
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [1, 2, 3]  # epochs counted from 1, as in the log (metrics.csv: from 0)
    assert line.get_ydata() == pytest.approx([np.mean(single) - 0.1 * (2 - e) for e in range(3)])
    for band in ax.collections:  # an accuracy's 95% band stays inside [0, 1]
        for path in band.get_paths():
            assert ((path.vertices[:, 1] >= 0) & (path.vertices[:, 1] <= 1)).all()
    assert report.curve_column(runs, ["test/acc_last5_mean"], None) == "test/acc"


def test_an_accuracy_band_stays_inside_0_and_1(tmp_path):
    """Two seeds at 0.99 and 0.90: the t-interval reaches past 1; the figure's band stops there."""
    for seed, acc in ((0, 0.99), (1, 0.90)):
        write_run(tmp_path / f"run{seed}", method="single", seed=seed, name=f"single_s{seed}",
                  summary={"epochs": 2, "test/acc_last5_mean": acc},
                  history=[{"epoch": e, "test/acc": acc, "time_s": 1.0} for e in range(2)])
    runs, _ = report.collect([str(tmp_path)])
    groups, _ = report.make_groups(runs, report.label_keys(runs))
    [(_, means, half)] = report.mean_curves(groups, "test/acc").values()
    assert (means + half > 1).all()  # the interval itself
    fig = report.figure(groups, "test/acc")
    [band] = fig.axes[0].collections
    assert band.get_paths()[0].vertices[:, 1].max() == pytest.approx(1.0)


@pytest.mark.parametrize("args, message", [
    (["EMPTY"], "error: no finished runs under"),
    (["SWEEP", "--metric", "test/accuracy"], "error: --metric test/accuracy: no run has it"),
    (["SWEEP", "--compare", "method=maxl", "lr=0.1"],
     "error: --compare lr=0.1: lr does not tell these runs apart; their settings: method"),
    (["SWEEP", "--compare", "method=maxl", "method=human"], "error: --compare method=human: no group has"),
    (["SWEEP", "--compare", "7", "1"], "error: --compare 7: no group 7"),
    (["SWEEP", "--plot", "OUT", "--curve", "val/acc"], "error: --curve val/acc: no run's metrics.csv"),
    (["SWEEP/nothing*here"], "error: SWEEP/nothing*here: no such file or folder"),
    (["SWEEP", "--json", "/table.json"], "error: --json /table.json: refusing to write at the top of the file "
                                         "system"),
    (["SWEEP", "--plot", ""], "error: --plot '': give a file name"),
])
def test_bad_inputs_are_one_line_errors_and_write_nothing(sweep, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    names = {"EMPTY": tmp_path / "empty", "SWEEP": sweep, "OUT": tmp_path / "out.png"}
    args = [str(names.get(a, a)).replace("SWEEP", str(sweep)) for a in args]
    with pytest.raises(SystemExit) as stop:
        report.main([*args, "--csv", str(tmp_path / "t.csv")])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1
    assert err.startswith(message.replace("SWEEP", str(sweep))), err
    assert not (tmp_path / "t.csv").exists() and not (tmp_path / "out.png").exists()


def test_globs_find_runs_at_any_depth(sweep, tmp_path, capsys):
    out = run_report(capsys, f"{tmp_path}/logs/**/*_single_s*")
    assert "3 runs in 1 groups" in out


# ---- what tells runs apart: the engine's run identity ---------------------------------------------------------

def fine_tune_runs(root, pretrained, seeds=(0, 1), **settings):
    """fine_tune-like runs (val/5shot) started from `pretrained` (a run name with {seed}), one per seed."""
    for seed in seeds:
        write_run(root / f"{pretrained.format(seed='')}_{seed}", script="fine_tune", seed=seed,
                  pretrained_model=pretrained.format(seed=seed), **settings,
                  summary={"val/5shot": 0.5 + seed / 100, "val/5shot_ci95": 0.01})


def test_runs_from_different_pretrained_models_are_different_groups(tmp_path, capsys):
    """pretrained_model is in the engine's run name: fine_tune from two labelers is two settings, not one run."""
    fine_tune_runs(tmp_path, "a_ll_s{seed}", seeds=(0,))
    fine_tune_runs(tmp_path, "b_ll_s{seed}", seeds=(0,))
    out = run_report(capsys, tmp_path, "--json", tmp_path / "t.json")
    document = json.loads((tmp_path / "t.json").read_text())
    assert document["settings"] == ["pretrained_model"] and [g["n"] for g in document["groups"]] == [1, 1]
    assert [g["settings"]["pretrained_model"] for g in document["groups"]] == ["a_ll_s<seed>", "b_ll_s<seed>"]
    assert "note:" not in out and "2 runs in 2 groups" in out


def test_a_setting_in_the_run_name_splits_groups_one_it_may_change_when_continued_does_not(tmp_path, capsys):
    """channels_last changes a run's name (two groups); device and num_workers do not (one group of two seeds)."""
    for channels_last in (False, True):
        for seed in (0, 1):
            write_run(tmp_path / f"{channels_last}_{seed}", seed=seed, channels_last=channels_last,
                      device=["cpu", "cuda"][seed], num_workers=seed, summary={"test/acc_last5_mean": 0.5})
    run_report(capsys, tmp_path, "--json", tmp_path / "t.json")
    document = json.loads((tmp_path / "t.json").read_text())
    assert document["settings"] == ["channels_last"] and [g["seeds"] for g in document["groups"]] == [[0, 1]] * 2


def test_chains_over_seeds_are_one_group_whose_inputs_follow_the_seed(tmp_path, capsys):
    """The pipeline's fine_tune of seed s starts from the labeler of seed s: replicates of one setting."""
    fine_tune_runs(tmp_path, "study_synthetic_fs_resnet12_learn_labeler_s{seed}", seeds=(0, 1, 2, 10))
    out = run_report(capsys, tmp_path, "--json", tmp_path / "t.json")
    [group] = json.loads((tmp_path / "t.json").read_text())["groups"]
    assert group["seeds"] == [0, 1, 2, 10] and "4 runs in 1 groups" in out


def test_a_run_folder_reached_twice_counts_once(sweep, capsys):
    out = run_report(capsys, sweep / "0_single_s0", sweep / "0_single_s0", f"{sweep}/*_single_s0",
                     sweep / "1_single_s1")
    assert "2 runs in 1 groups" in out and "note:" not in out


# ---- default metrics: the run's headline ------------------------------------------------------------------------

def test_default_metrics_are_the_headline_the_run_names(tmp_path, capsys):
    for seed in (0, 1):
        write_run(tmp_path / f"maxl_{seed}", seed=seed, summary={"headline": ["test/acc_best"], "test/acc_best": 0.8,
                                                                 "test/acc_last5_mean": 0.7})
        write_run(tmp_path / f"eval_{seed}", script="meta_eval", seed=seed, results={
            "checkpoint": str(tmp_path / "gone.pt"), "script": "fine_tune", "split": "val", "headline": ["val/5shot"],
            "results": {shots: {"overall": {"mean": 0.6, "ci95": 0.02}} for shots in ("1", "5")}})
    out = run_report(capsys, tmp_path, "--json", tmp_path / "t.json")
    document = json.loads((tmp_path / "t.json").read_text())
    assert document["metrics"] == ["val/5shot", "test/acc_best"] and "4 runs in 2 groups" in out
    assert "note: same settings" not in out


def test_runs_without_a_headline_keep_the_inferred_defaults():
    assert report.legacy_headline({"test/acc_last5_mean": 0.7, "test/acc_best": 0.8}) == ["test/acc_last5_mean"]
    assert report.legacy_headline({"val/1shot": 0.4, "val/1shot_ci95": 0.1, "val/5shot/aircraft": 0.5,
                                   "val/5shot": 0.6, "epochs": 3}) == ["val/1shot", "val/5shot"]
    assert report.headline({"headline": ["test/5shot"]}, {"test/1shot": 0.1}) == ["test/5shot"]


def test_the_report_imports_neither_torch_nor_hydra():
    code = "import sys, tools.report; print(sorted({'torch', 'hydra', 'torchvision'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
