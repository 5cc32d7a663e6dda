"""HF -> Megatron -> HF bit for bit, and Megatron logits vs transformers' Step-3.5 decoder, per layout.

TP=2 splits the 2 KV groups (one per rank) and with them the head-wise gate rows; EP=2 puts two of
the four experts on each rank. Logits are compared in fp32: measured max abs diff 3-4e-6 at every
layout (logits are of order 1), tolerance 5e-5; 12 tokens against a window of 4, so the sliding
window, the clamps, the router bias and llama3 scaling each move the logits by 0.3 to 4 if wrong.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bridgecore.cli import main

HERE = Path(__file__).parent
TOLERANCE = 5e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(result: dict) -> None:
    assert result["missing"] == [] and result["different"] == [] and result["config_equal"]
    assert result["max_abs_diff"] < TOLERANCE, result["max_abs_diff"]


def test_cli_tp1(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bridgecore roundtrip`, `verify` and `demo` (through torch_dist) on the tiny model, in-process."""
    assert main(["roundtrip", str(tiny_dir)]) == 0
    assert main(["verify", str(tiny_dir), "--rtol", str(TOLERANCE)]) == 0
    assert main(["demo", "--only", "step35", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "95/95 tensors identical" in out and "argmax agreement 100.0%" in out


@pytest.mark.parametrize(("tp", "ep"), [(2, 1), (2, 2)])
def test_two_ranks(tiny_dir: Path, tmp_path: Path, tp: int, ep: int) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        str(HERE / "step35_roundtrip_worker.py"),
        str(tiny_dir),
        str(tmp_path),
        str(tp),
        str(ep),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    check(json.loads((tmp_path / "result.json").read_text()))
