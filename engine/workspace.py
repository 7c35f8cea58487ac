"""Where data and checkpoints live: `$WORKSPACE/metaL_data` and `$WORKSPACE/checkpoint` (the original layout; the
configs place checkpoints with `checkpoint_dir: ${workspace}/checkpoint/...`)."""
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_WORKSPACE = "./workspace"


def workspace_root() -> Path:
    """`$WORKSPACE`, or ./workspace when it is unset (callers print which one is used)."""
    return Path(os.environ.get("WORKSPACE") or DEFAULT_WORKSPACE).expanduser().resolve()


def data_root() -> Path:
    return workspace_root() / "metaL_data"


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write in the block, renamed to `path` when the block ends without an error:
    readers never see half a file (a process killed meanwhile leaves `.<name>.tmp<pid>`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    yield tmp
    os.replace(tmp, path)
