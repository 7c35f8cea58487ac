"""A refused input changes no file: after a finished run, bad values for the same run are one-line errors and every
file of the workspace and of the logs is byte-identical afterwards."""
from conftest import one_line_error, run_in_process

RUN = ["dataset=synthetic_hier", "dataset.generate.train_per_class=4", "model.width_mult=0.0625", "device=cpu",
       "num_workers=0", "progress=false", "batch_size=50", "method=single", "epochs=1", "name=kept"]


def snapshot(*roots):
    return {path: path.read_bytes() for root in roots for path in sorted(root.rglob("*")) if path.is_file()}


def test_bad_values_for_an_existing_run_leave_every_file_as_it_was(tmp_path, workspace):
    assert run_in_process("maxl_train.py", *RUN, cwd=tmp_path, workspace=workspace).returncode == 0
    before = snapshot(workspace, tmp_path / "logs")
    for bad, message in ((["lr=-1"], "lr=-1: lr must be a number > 0"),
                         (["psi=2.5"], "psi=2.5:"),
                         (["epochs=0", "overwrite=true"], "epochs=0: epochs must be an integer >= 1"),
                         (["resume=true", "overwrite=true"], "contradict")):
        result = run_in_process("maxl_train.py", *RUN, *bad, cwd=tmp_path, workspace=workspace)
        assert message in one_line_error(result), bad
        assert snapshot(workspace, tmp_path / "logs") == before, bad
