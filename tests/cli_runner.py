"""Running the CLI as users run it, for the tests of every folder."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, nproc: int = 1, plugins: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`bridgecore ARGS` in a subprocess (under torchrun for nproc > 1); output captured."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    if plugins is not None:
        env["BRIDGECORE_PLUGINS"] = plugins
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            "-m",
            "bridgecore",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "bridgecore", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
