"""Running ``bridgecore`` for a tiny model in child processes, as a user would: ``torchrun`` for
several ranks, ``BRIDGECORE_PLUGINS`` naming the one plugin the model exercises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
#: tiny model -> (plugin, extra import flags); the VL checkpoint's vision tower, which is not
#: converted, needs none: every path keeps it verbatim (passthrough).
TINY = {
    "llama-example": ("llama_example", []),
    "step35": ("step35", []),
    "step37": ("step37", []),
    "qwen35-dense": ("qwen35", []),
    "qwen35-moe": ("qwen35", []),
    "qwen36-moe-vl": ("qwen35", []),
}


def bridgecore(name: str, *args: str | Path, ranks: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``bridgecore ARGS`` for tiny model ``name`` (under torchrun with ``ranks`` > 1).

    ``check=False`` accepts a non-zero exit: a round trip that leaves waived tensors out says so.
    """
    env = dict(os.environ, BRIDGECORE_PLUGINS=TINY[name][0], OMP_NUM_THREADS="1")
    if ranks > 1:
        command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(ranks), "-m", "bridgecore"]
    else:
        command = [str(BIN / "bridgecore")]
    done = subprocess.run(
        command + [str(a) for a in args], check=False, env=env, capture_output=True, text=True, timeout=600
    )
    shown = " ".join(map(str, args))
    assert done.returncode == 0 or not check, (
        f"bridgecore {shown} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done
