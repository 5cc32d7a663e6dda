"""HF -> Megatron -> HF bit for bit through the `bridgecore` CLI, both on-disk layouts, TP 1 and 2.

TP=2 splits the language model (2 KV groups, one per rank); the tower and projector are replicated,
written by rank 0. The torch_dist test imports at TP=2 and exports at TP=1 (resharding on load).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "BRIDGECORE_PLUGINS": "step35,step37"}


def _bridgecore(args: list[str], ranks: int = 1) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    # A hung collective must fail the test, not the session.
    done = subprocess.run(
        [sys.executable, *launcher, "-m", "bridgecore", *args], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("layout", ["released", "resaved"])
def test_roundtrip(request: pytest.FixtureRequest, layout: str, tp: int) -> None:
    src: Path = request.getfixturevalue(f"{layout}_dir")
    done = _bridgecore(["roundtrip", str(src), "--tp", str(tp)], ranks=tp)
    assert "bit-exact" in done.stdout


def test_torch_dist_import_tp2_export_tp1(resaved_dir: Path, tmp_path: Path) -> None:
    _bridgecore(["import", str(resaved_dir), str(tmp_path / "megatron"), "--tp", "2"], ranks=2)
    _bridgecore(["export", str(tmp_path / "megatron"), str(tmp_path / "hf")])
    from bridgecore.compare import compare_checkpoints

    report = compare_checkpoints(resaved_dir, tmp_path / "hf")
    assert report.exact, [r for r in report.rows if r.status != "exact"]
    assert any(r.name == "model.vision_model.conv1.weight" for r in report.rows)
