"""Export of Megatron-LM training checkpoints (``megatron_lm.py``: model, optimizer and RNG state in one
torch_dist save, ``args`` in common.pt, iteration directories and tracker) with ``--hf-config``, at a
layout other than the one that saved them, in memory and ``--offline``, bit for bit against the HF
checkpoint the training started from. One case per family runs by default; ``-m slow`` runs the rest.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from interop_support import save_training

from bridgecore.cli import main
from bridgecore.compare import compare_checkpoints

slow = pytest.mark.slow

# (tiny model, ranks, layout the training saved at)
CASES = [
    ("step35", 2, ["--ep", "2"]),
    ("step37", 2, ["--tp", "2"]),
    ("qwen35-moe", 2, ["--pp", "2", "--vpp", "2"]),
    pytest.param("llama-example", 2, ["--pp", "2"], marks=slow),
    pytest.param("step35", 2, ["--tp", "2"], marks=slow),
    pytest.param("step35", 2, ["--pp", "2", "--vpp", "2"], marks=slow),
    pytest.param("step37", 2, ["--ep", "2"], marks=slow),
    pytest.param("step37", 2, ["--pp", "2", "--vpp", "2"], marks=slow),
    pytest.param("qwen35-moe", 2, ["--tp", "2"], marks=slow),
    pytest.param("qwen35-moe", 2, ["--ep", "2"], marks=slow),
    pytest.param("qwen35-dense", 2, ["--tp", "2"], marks=slow),
    pytest.param("qwen35-dense", 2, ["--pp", "2", "--vpp", "2"], marks=slow),
]


def _exact(source: Path, exported: Path) -> None:
    report = compare_checkpoints(source, exported)
    assert report.exact, [r for r in report.rows if r.status != "exact"][:5]


@pytest.mark.parametrize(
    ("name", "ranks", "layout"), CASES, ids=lambda v: "".join(v).replace("--", "") if isinstance(v, list) else None
)
def test_training_checkpoint_exports_bit_exact(tiny_hf, tmp_path: Path, name: str, ranks: int, layout: list[str]):
    hf = tiny_hf(name)
    trained = save_training(name, hf, tmp_path / "run", ranks, *layout, "--iteration", "300")
    for mode in ([], ["--offline"]):
        out = tmp_path / f"hf{'-'.join(['', *mode])}"
        assert main(["export", str(trained), str(out), "--hf-config", str(hf), *mode]) == 0
        _exact(hf, out)
