from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bridgecore_qwen35 import tiny
from safetensors import safe_open

VARIANTS = {"dense": tiny.write_dense, "moe": tiny.write_moe, "moe-vl": tiny.write_moe_vl}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny variant in its released layout, written once."""
    root = tmp_path_factory.mktemp("qwen35")
    for name, write in VARIANTS.items():
        write(root / name)
    return {name: root / name for name in VARIANTS}
