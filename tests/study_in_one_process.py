"""The interpreter `make` runs for the documentation's blocks (tests/docs_blocks.py): `python -m tools.X ...` or
`python SCRIPT.py ...` as with python itself, except that a study's steps (tools.study, tools.pipeline) run in this
one process (tests/conftest.py: `launch_studies_in_process`), which saves every step the seconds a new process
spends importing torch. The block, make and the study's own process stay real."""
import importlib
import runpy
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

from conftest import launch_studies_in_process  # noqa: E402

if __name__ == "__main__":
    launch_studies_in_process(setattr)
    if sys.argv[1:3] in (["-m", "tools.study"], ["-m", "tools.pipeline"]):
        # the module launch_studies_in_process patched (runpy would run a fresh, unpatched copy as __main__)
        sys.exit(importlib.import_module(sys.argv[2]).main(sys.argv[3:]))
    if sys.argv[1] == "-m":
        sys.argv = [sys.argv[2], *sys.argv[3:]]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
