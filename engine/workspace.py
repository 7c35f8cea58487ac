"""Where data and checkpoints live: `$WORKSPACE/metaL_data` and `$WORKSPACE/checkpoint` (the original layout; the
configs place checkpoints with `checkpoint_dir: ${workspace}/checkpoint/...`)."""
import os
from pathlib import Path

DEFAULT_WORKSPACE = "./workspace"


def workspace_root() -> Path:
    """`$WORKSPACE`, or ./workspace when it is unset (callers print which one is used)."""
    return Path(os.environ.get("WORKSPACE") or DEFAULT_WORKSPACE).expanduser().resolve()


def data_root() -> Path:
    return workspace_root() / "metaL_data"
