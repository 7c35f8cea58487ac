"""A checkpoint that is not tensors and plain data is refused without advice to load it unrestricted
(torch's own message suggests weights_only=False or allow-listing the object, which would run the file's code)."""
import os

import pytest
import torch

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.errors import UserError

FIX = "run maxl_train.py first"
UNSAFE_ADVICE = ("weights_only", "safe_globals", "trusted", "add_safe")


class MakesADirectory:
    """Unpickling this calls os.mkdir: a stand-in for a checkpoint that runs code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_checkpoint_naming_a_callable_is_refused_and_runs_nothing(tmp_path):
    witness = str(tmp_path / "the_file_ran_code")
    torch.save({"state": MakesADirectory(witness), "config": {}}, tmp_path / "evil.pt")
    with pytest.raises(UserError) as refused:
        load_checkpoint(tmp_path / "evil.pt", FIX)
    assert str(refused.value) == (f"checkpoint {tmp_path / 'evil.pt'} is refused: it names the Python object "
                                  f"{os.mkdir.__module__}.mkdir, and loading it would run code from the file; "
                                  f"metalabel checkpoints hold only tensors and plain data: {FIX}")
    assert not os.path.exists(witness)


@pytest.mark.parametrize("content", [b"<!DOCTYPE html><html>Log in</html>", bytes(range(256)) * 4])
def test_a_foreign_file_is_named_without_unsafe_advice(tmp_path, content):
    (tmp_path / "last.pt").write_bytes(content)
    with pytest.raises(UserError) as refused:
        load_checkpoint(tmp_path / "last.pt", FIX)
    message = str(refused.value)
    assert message.startswith(f"checkpoint {tmp_path / 'last.pt'} is corrupt or not a checkpoint (") and FIX in message
    assert not any(advice in message for advice in UNSAFE_ADVICE) and "\n" not in message


def test_a_checkpoint_of_tensors_and_plain_data_loads(tmp_path):
    save_checkpoint(tmp_path / "good.pt", {"state": {"w": torch.arange(3.0)}, "config": {"lr": 0.1}})
    payload = load_checkpoint(tmp_path / "good.pt", FIX)
    assert torch.equal(payload["state"]["w"], torch.arange(3.0)) and payload["config"] == {"lr": 0.1}
