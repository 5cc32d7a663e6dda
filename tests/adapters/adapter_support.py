"""Helpers of the adapter tests: PEFT adapters made by peft, weight deltas, torch_dist tensors.

A PEFT adapter is made by peft itself on a module tree with the checkpoint's own names: one
``nn.Linear`` per 2-D ``<module>.weight`` of the HF checkpoint whose module name ends in a target
(so every family, the experts stored per expert included, gets one without per-family code), given
random A and B (``init_lora_weights=False``), saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bridgecore import testing
from bridgecore.plugins import installed

HERE = Path(__file__).parent
#: the ``native`` fixture: (name, tp, ep, which) -> (HF dir, Megatron adapter checkpoint)
Native = Callable[[str, int, int, str], tuple[Path, Path]]
#: tiny model -> the plugin that converts it
PLUGIN = {
    "llama-example": "llama_example",
    "step35": "step35",
    "step37": "step37",
    "qwen35-dense": "qwen35",
    "qwen35-moe": "qwen35",
}
#: the HF linears a LoRA adapter goes on, per family (routers and the shared-expert gate have no
#: column- or row-parallel Megatron linear, and are refused by name: test_adapter_refusals)
TARGETS = {
    "llama-example": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen35-dense": ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
                     "out_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen35-moe": ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
                   "out_proj", "gate_proj", "up_proj", "down_proj"],
    "step35": ["q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "gate_proj", "up_proj", "down_proj"],
    "step37": ["q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "gate_proj", "up_proj", "down_proj"],
}  # fmt: skip


def env(name: str) -> dict[str, str]:
    return dict(os.environ, BRIDGECORE_PLUGINS=PLUGIN[name], OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def write_tiny(name: str, out: Path) -> Path:
    if PLUGIN[name] not in installed().infos:
        pytest.skip(f"plugin {PLUGIN[name]} is not installed here")
    return testing.write_tiny(PLUGIN[name], name, out)


def hf_linears(hf_dir: Path, targets: list[str]) -> dict[str, tuple[int, int]]:
    """Every 2-D ``<module>.weight`` of the checkpoint whose module's last name is a target: (out, in)."""
    index = hf_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    out = {}
    for file in files:
        with safe_open(hf_dir / file, "pt") as f:
            for key in f.keys():  # noqa: SIM118
                shape = f.get_slice(key).get_shape()
                module = key.removesuffix(".weight")
                if key.endswith(".weight") and len(shape) == 2 and module.rsplit(".", 1)[-1] in targets:
                    out[module] = (shape[0], shape[1])
    return out


def skeleton(linears: dict[str, tuple[int, int]]) -> torch.nn.Module:
    """A module tree with an ``nn.Linear`` under each of ``linears``' names."""
    root = torch.nn.Module()
    for name, (rows, cols) in sorted(linears.items()):
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.add_module(leaf, torch.nn.Linear(cols, rows, bias=False))
    return root


def make_peft(
    hf_dir: Path, out: Path, targets: list[str], r: int = 4, alpha: int = 8, seed: int = 0, **config: object
) -> Path:
    """A PEFT LoRA adapter of the checkpoint's linears named in ``targets``, saved by peft."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(
        skeleton(hf_linears(hf_dir, targets)),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **config),
    )
    model.save_pretrained(out)
    return out


def deltas(peft_dir: Path) -> dict[str, torch.Tensor]:
    """Each adapted module's weight delta ``scale * B @ A``, summed over the rank in its order in fp64
    (exact products, zero terms exactly zero): equal for equal adapters, bit for bit."""
    from bridgecore.hf.peft import read_peft

    adapter = read_peft(peft_dir)
    out = {}
    for module, a in adapter.a.items():
        b = adapter.b[module].double()
        delta = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64)
        for j in range(a.shape[0]):
            delta += torch.outer(b[:, j], a[j].double())
        out[module] = delta * adapter.scale_of(module)
    return out


def torch_dist_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Every saved tensor of a torch_dist checkpoint, whole (read by torch's own DCP reader)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(ckpt_dir / "release"))
    metadata = reader.read_metadata()
    state = {
        k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for k, m in metadata.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }
    load(state, storage_reader=reader, no_dist=True)
    return state


def run_worker(*args: str | Path, ranks: int, name: str) -> str:
    """``adapter_worker.py ARGS`` under torchrun (gloo) on ``ranks`` processes; its output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    command += [str(HERE / "adapter_worker.py"), *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, env=env(name), timeout=600, check=False)
    if done.returncode:
        raise AssertionError(
            f"adapter worker failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        )
    return done.stdout
