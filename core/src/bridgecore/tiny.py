"""Tiny checkpoints: what a plugin's ``tiny_models`` hook returns, and a writer for them.

A tiny model keeps every structural feature of its family (layer-type patterns, dense/MoE split,
MTP, gates, norms) at a size that converts in seconds on a CPU. Its generator writes random tensors
with the released checkpoint's names, dtypes and sharding (``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class TinyModel:
    name: str
    description: str
    #: writes config.json and the safetensors files into an empty directory.
    write: Callable[[Path], None]


def write_checkpoint(out: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], shards: int = 2) -> None:
    """Write ``tensors`` as ``shards`` safetensors files plus index, and ``config.json``, as HF does."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    names = list(tensors)
    shards = max(1, min(shards, len(names)))
    if shards == 1:
        save_file(
            {n: tensors[n].contiguous() for n in names}, str(out / "model.safetensors"), metadata={"format": "pt"}
        )
        return
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i * per : (i + 1) * per]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def random_tensor(
    shape: tuple[int, ...] | list[int], dtype: torch.dtype, generator: torch.Generator, std: float = 0.02
) -> torch.Tensor:
    """Normal(0, std) values, drawn in fp32 then cast: the same bits for the same seed everywhere."""
    return (torch.randn(tuple(shape), generator=generator) * std).to(dtype)
