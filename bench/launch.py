"""Running a bench's measuring part in fresh processes: one, or `nproc` ranks under torchrun."""
import os
import subprocess
import sys


def run_processes(script: str, args: list[str], nproc: int, port: int) -> str:
    """stdout of `python script args` (torchrun with `nproc` ranks when nproc > 1); a failure exits with its
    stderr. Each run is fresh, so its peak memory and warm-up are its own."""
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}"]
    done = subprocess.run([*launcher, script, *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if done.returncode:
        raise SystemExit(f"error: {' '.join([os.path.basename(script), *args])} in {nproc} process(es) failed:\n"
                         f"{done.stderr[-3000:]}")
    return done.stdout
