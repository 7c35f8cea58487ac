"""Checkpoints: written atomically, loaded with `weights_only=True`, found by name or path."""
import hashlib
import pickle
import re
from pathlib import Path

import torch

from engine.errors import UserError
from engine.workspace import written_atomically


def file_identity(path: Path) -> str:
    """What a later step records of the checkpoint it started from: the sha256 of its bytes. Not script, epoch,
    size and mtime: a run extended, or started again with as many epochs, writes the same epoch and position, and a
    copied or touched file is still the same one."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves a half-written checkpoint."""
    with written_atomically(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, fix: str) -> dict:
    """Load a checkpoint written by `save_checkpoint`; `fix` tells the user what to do if it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: {fix}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise UserError(_load_failure(path, exc, fix)) from None
    if not isinstance(payload, dict) or "state" not in payload or "config" not in payload:
        raise UserError(f"checkpoint {path} was not written by metalabel (no 'state'/'config'): {fix}")
    return payload


def _load_failure(path: Path, exc: Exception, fix: str) -> str:
    """Why torch.load refused `path`, in words that never suggest loading it unrestricted: torch's weights-only error
    advises weights_only=False (or allow-listing the object), which would let an untrusted file run code."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text:
        named = re.search(r"GLOBAL ([\w.]+)", text)
        if named:
            return (f"checkpoint {path} is refused: it names the Python object {named[1]}, and loading it would run "
                    f"code from the file; metalabel checkpoints hold only tensors and plain data: {fix}")
        return f"checkpoint {path} is corrupt or not a checkpoint (not tensors and plain data): {fix}"
    reason = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"checkpoint {path} is corrupt or not a checkpoint ({reason}): {fix}"


def resolve_checkpoint(name_or_path: str, directory: Path, key: str, produced_by: str) -> Path:
    """A checkpoint given as a path, or as a run name under `directory` (`<name>/best.pt`)."""
    if not name_or_path:
        raise UserError(f"{key} is not set: give the run name or .pt path of a checkpoint written by {produced_by}")
    given, directory = Path(str(name_or_path)).expanduser(), Path(directory)
    for candidate in (given, given / "best.pt", directory / given / "best.pt", directory / given):
        if candidate.is_file():
            return candidate
    raise UserError(f"{key}={name_or_path}: no checkpoint at {given} or {directory / given / 'best.pt'}; "
                    f"run {produced_by} first or give the path of its .pt file")
