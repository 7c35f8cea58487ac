"""The documentation's runnable commands: a fenced block whose info string is `sh toy NAME` (README.md, docs/*.md)
holds shell commands that run as printed at toy scale. `run_block` runs one in a temporary copy of the project
with its own $WORKSPACE, `make` skipping the set-up (`-o .venv/.installed`) and `python` being this interpreter, and
checks that it wrote nothing outside that copy."""
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from conftest import ROOT

DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
MARKER = re.compile(r"^```sh toy (\S+)\s*$")


@dataclass
class Block:
    name: str
    where: str  # file:line
    text: str


def marked_blocks() -> dict[str, Block]:
    blocks = {}
    for path in DOCS:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if match := MARKER.match(line):
                end = next(i for i in range(number + 1, len(lines)) if lines[i].startswith("```"))
                name = match.group(1)
                assert name not in blocks, f"two runnable blocks named {name}"
                blocks[name] = Block(name, f"{path.relative_to(ROOT)}:{number + 1}", "\n".join(lines[number + 1:end]))
    return blocks


def project_copy(tmp_path: Path) -> Path:
    """The working tree's files (tracked and untracked, not ignored) under tmp_path/project, with .venv linked."""
    copy = tmp_path / "project"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() and not name.startswith(".venv"):
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    (copy / ".venv").symlink_to((ROOT / ".venv").resolve())
    return copy


def _tools(folder: Path) -> Path:
    """`make` and `python` as the documentation's commands expect them, for this test's interpreter."""
    folder.mkdir()
    make = shutil.which("make")
    # PY: the copy's tests/study_in_one_process.py ($PWD: make runs in the copy's root)
    (folder / "make").write_text(f'#!/bin/sh\nexec {make} -o .venv/.installed '
                                 f'PY="{sys.executable} $PWD/tests/study_in_one_process.py" "$@"\n')
    (folder / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    for tool in folder.iterdir():
        tool.chmod(0o755)
    return folder


def _outside(tmp_path: Path) -> dict:
    """What a stray write would change: the project's own files and the file system's top."""
    status = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=ROOT,
                            capture_output=True, text=True).stdout.splitlines()
    new_files = sorted(line for line in status if line.startswith(("??", "!!")) and "__pycache__" not in line)
    return {"project": new_files, "top": sorted(os.listdir("/")), "tmp": sorted(os.listdir(tmp_path))}


def run_block(block: Block, tmp_path: Path, timeout: int = 900, **environment) -> tuple[Path, str]:
    """Run a marked block with `sh -e` in a fresh copy; returns (the copy, its output). Fails on a non-zero exit
    or on a file written outside the copy and its workspace."""
    copy = project_copy(tmp_path)
    tools = _tools(tmp_path / "bin")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    before = _outside(tmp_path)
    env = dict(os.environ, WORKSPACE=str(workspace), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               PATH=f"{tools}{os.pathsep}{os.environ['PATH']}", **environment)
    for variable in ("ARGS", "SEEDS", "STUDY_DIR", "NAME", "DATASET", "DATASETS", "MODELS", "TORCH_SPEC"):
        if variable not in environment:
            env.pop(variable, None)
    done = subprocess.run(["sh", "-e", "-c", block.text], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{block.where} ({block.name}) failed:\n{output[-4000:]}"
    after = _outside(tmp_path)
    stray = {place: sorted(set(after[place]) ^ set(before[place])) for place in before if after[place] != before[place]}
    assert not stray, f"{block.where} ({block.name}) wrote outside its copy: {stray}"
    return copy, output
