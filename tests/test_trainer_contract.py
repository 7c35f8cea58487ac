"""What the engine reads from a job and a script, and nothing else: the skipped-steps count the job names (not any
key that looks like one), the learning-rate key the script names, the job's headline metrics in summary.json.
Epochs count from 1 in messages."""
import json
import math
from dataclasses import replace

import pytest
import torch

from engine import compose
from engine.errors import UserError
from engine.session import Session
from engine.trainer import Phase, TrainingJob
from methods.scripts import SCRIPTS


class ToyJob(TrainingJob):
    """A linear model on 8 points, 4 steps of 2 per epoch; `skip_from`: the epoch from which every step is skipped
    (counted in `train/skipped_steps`); `nan_from`: the epoch from which the loss is NaN."""

    monitors = {"best": "score"}

    def __init__(self, session, skip_from=math.inf, nan_from=math.inf):
        self.model = torch.nn.Linear(2, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.loader = session.loader(torch.utils.data.TensorDataset(torch.randn(8, 2)), 2, shuffle=True)
        self.skip_from, self.nan_from = skip_from, nan_from

    def state_objects(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer}

    def phases(self, epoch: int) -> list[Phase]:
        def step(batch, tracker):
            loss = self.model(batch[0]).pow(2).mean() * (math.nan if epoch >= self.nan_from else 1.0)
            tracker.add("train/loss", loss, len(batch[0]))
            tracker.total("train/skipped_steps", int(epoch >= self.skip_from))

        return [Phase("train", self.loader, step)]

    def evaluate(self, epoch: int) -> dict:
        return {"score": float(epoch)}

    def summarize(self, history: list[dict]) -> dict:
        return {"score_last": history[-1]["score"]}


def fit(tmp_path, job_class, spec, epochs=2, overwrite=True, **kwargs):
    cfg = compose(SCRIPTS["maxl_train"], ["device=cpu", "num_workers=0", "progress=false", f"epochs={epochs}",
                                 "name=toy", f"overwrite={overwrite}"])
    session = Session(cfg, tmp_path / "run", spec)
    try:
        return session.fit(job_class(session, **kwargs), epochs), session
    finally:
        session.close()


def test_session_keeps_the_script_name_and_its_spec(tmp_path, workspace):
    spec = SCRIPTS["maxl_train"]
    summary, session = fit(tmp_path, ToyJob, spec)
    assert session.script == "maxl_train" and session.spec is spec
    assert torch.load(session.checkpoint_dir / "last.pt", weights_only=True)["script"] == "maxl_train"


def test_skipped_steps_count_only_when_the_job_names_them(tmp_path, workspace):
    fit(tmp_path, ToyJob, replace(SCRIPTS["maxl_train"], lr_key=None), skip_from=1)  # not named: the key's name means nothing

    class Named(ToyJob):
        skipped_steps_metric = "train/skipped_steps"

    with pytest.raises(UserError) as diverged:
        fit(tmp_path, Named, replace(SCRIPTS["maxl_train"], lr_key=None), skip_from=1)
    assert str(diverged.value).startswith("the loss was not finite in 4 of 4 steps of epoch 2/2 (train): the run "
                                          "diverged; lower the learning rate and start again with overwrite=true")


def test_a_nonfinite_loss_names_the_epoch_from_1_and_the_scripts_lr_key(tmp_path, workspace):
    with pytest.raises(UserError) as diverged:
        fit(tmp_path, ToyJob, SCRIPTS["maxl_train"], nan_from=1)
    assert str(diverged.value).startswith("train/loss is not finite at epoch 2/2 step 0 (train): the run diverged; "
                                          "lower lr (now 0.01) and start again")
    assert "the last good checkpoint" in str(diverged.value)


def test_the_headline_goes_into_summary_json_when_the_job_has_one(tmp_path, workspace):
    summary, session = fit(tmp_path, ToyJob, replace(SCRIPTS["maxl_train"], lr_key=None))
    assert "headline" not in json.loads((session.run_dir / "summary.json").read_text())

    class Headlined(ToyJob):
        headline = ["score_last"]

    summary, session = fit(tmp_path, Headlined, replace(SCRIPTS["maxl_train"], lr_key=None))
    written = json.loads((session.run_dir / "summary.json").read_text())
    assert written["headline"] == summary["headline"] == ["score_last"] and written["score_last"] == 1.0
    assert written["checkpoints"] == {"best": {"score": 1.0}}


def test_resume_messages_count_epochs_from_1(tmp_path, workspace, caplog):
    fit(tmp_path, ToyJob, replace(SCRIPTS["maxl_train"], lr_key=None), epochs=1)
    with caplog.at_level("INFO", logger="metalabel"):
        fit(tmp_path, ToyJob, replace(SCRIPTS["maxl_train"], lr_key=None), epochs=2, overwrite=False)
        fit(tmp_path, ToyJob, replace(SCRIPTS["maxl_train"], lr_key=None), epochs=2, overwrite=False)
    resumed = [r.getMessage().split(" from ")[0] for r in caplog.records if r.getMessage().startswith("resumed")]
    assert resumed == ["resumed at epoch 2/2 step 0", "resumed after epoch 2, the last of 2"]
    assert any(r.getMessage().startswith("epoch 2/2 (") for r in caplog.records)
