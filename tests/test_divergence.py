"""A diverging run stops with one line naming where and what to change, and leaves the last good checkpoint as it
was."""
from conftest import one_line_error, run_in_process

MAXL = ["dataset=synthetic_hier", "dataset.generate.train_per_class=4", "model.width_mult=0.0625", "device=cpu",
        "num_workers=0", "progress=false", "batch_size=50", "method=single", "name=diverging"]
MELA = ["dataset=synthetic_fs", "model.width_mult=0.125", "device=cpu", "num_workers=0", "progress=false",
        "test_db_size=4", "n_shots=1", "n_queries=2", "name=diverging"]


def test_maxl_on_nan_stops_with_the_step_and_keeps_the_good_checkpoint(tmp_path, workspace):
    # epoch 1 at lr 0.01 is fine; the schedule then multiplies lr by 1e30, and epoch 2 diverges (on any CPU)
    result = run_in_process("maxl_train.py", *MAXL, "epochs=2", "lr_step=1", "lr_gamma=1e30", cwd=tmp_path,
                        workspace=workspace)
    line = one_line_error(result)
    assert "is not finite at epoch 2/2 step " in line and "the run diverged; lower lr (now 0.01)" in line
    folder = workspace / "checkpoint" / "maxl" / "diverging"
    assert f"the last good checkpoint {folder / 'last.pt'} is kept" in line
    import torch

    for kept in ("last.pt", "best.pt"):
        payload = torch.load(folder / kept, weights_only=True)
        assert payload["epoch"] == 0 and payload["position"] is None
        assert all(torch.isfinite(v).all() for v in payload["state"]["model"].values() if v.is_floating_point())


def test_meta_learning_with_a_singular_solve_stops_cleanly(tmp_path, workspace):
    result = run_in_process("learn_meta_repr.py", *MELA, "epochs=1", "learning_rate=1e6", cwd=tmp_path,
                        workspace=workspace)
    line = one_line_error(result)
    assert "the run diverged; lower learning_rate (now 1000000.0)" in line and "epoch 1/1" in line
    assert not list((workspace / "checkpoint" / "label_learn" / "saves" / "diverging").glob("*.pt"))


def test_a_learning_rate_beyond_the_weights_float_range_is_one_line(tmp_path, workspace):
    result = run_in_process("maxl_train.py", *MAXL, "epochs=1", "lr=1e300", cwd=tmp_path, workspace=workspace)
    line = one_line_error(result)
    assert "an update overflowed at epoch 1/1 step 0" in line and "lower lr (now 1e+300)" in line
    assert not (workspace / "checkpoint" / "maxl" / "diverging" / "last.pt").exists()
