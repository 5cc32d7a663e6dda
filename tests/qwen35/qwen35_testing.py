"""Helpers shared by the qwen35 tests (a module of its own: every test folder has a conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from bridgecore_qwen35 import tiny

VARIANTS = {"dense": tiny.write_dense, "moe": tiny.write_moe, "moe-vl": tiny.write_moe_vl}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
