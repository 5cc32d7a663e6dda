"""Make a tiny checkpoint look ModelOpt-calibrated (max calibration): per-tensor amax on every linear.

A weight amax is the largest |w| of its linear, shared by the linears Megatron fuses into one
quantizer (q/k/v/g into linear_qkv, gate/up into linear_fc1) as one quantizer would hold it; stacked
experts ``[E, ...]`` get one per expert, ``[E]``. Input amax and the k/v bmm amax of attention are
random positive values (no activations are run).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from bridgecore.tiny import write_checkpoint

# Routers and gates (shared_expert_gate too) and the vision tower stay unquantized, as ModelOpt's
# LLM recipes leave them.
_SKIP = re.compile(
    r"norm|embed|lm_head|mlp\.gate\.|moe\.gate\.|router|shared_head|conv1d|shared_expert_gate|vision_model|vit_"
)
_FUSED = re.compile(r"\.(q|k|v|g)_proj$|\.(gate|up)_proj$|\.in_proj_(qkv|z|b|a)$")


def _quantizer_group(module: str) -> str:
    # Megatron fuses q/k/v(/g), gate/up and the GDN in_proj parts into one linear, one quantizer.
    return _FUSED.sub(lambda m: ".qkv" if m.group(1) else ".gate_up" if m.group(2) else ".in_proj", module)


def calibrate(src: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rewrite the checkpoint in ``src`` with amax tensors added; returns all its tensors."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors |= load_file(file)
    linears = {
        n[: -len(".weight")]: t
        for n, t in tensors.items()
        if n.endswith(".weight") and t.dim() >= 2 and not _SKIP.search(n)
    }
    weight_amax: dict[str, torch.Tensor] = {}
    for module, weight in linears.items():
        amax = weight.float().abs().flatten(-2).amax(-1)  # [] per linear, [E] per stacked expert
        group = _quantizer_group(module)
        weight_amax[group] = torch.maximum(weight_amax[group], amax) if group in weight_amax else amax
    g = torch.Generator().manual_seed(seed)
    input_amax = {group: torch.rand(amax.shape, generator=g) + 0.1 for group, amax in weight_amax.items()}
    for module in linears:
        group = _quantizer_group(module)
        tensors[f"{module}.weight_quantizer._amax"] = weight_amax[group].clone()
        tensors[f"{module}.input_quantizer._amax"] = input_amax[group].clone()
        if module.endswith(".q_proj"):
            attn = module[: -len(".q_proj")]
            for s in ("k_bmm_quantizer", "v_bmm_quantizer"):
                tensors[f"{attn}.{s}._amax"] = torch.rand((), generator=g) + 0.1
    config = json.loads((src / "config.json").read_text())
    for file in src.iterdir():
        file.unlink()
    write_checkpoint(src, config, tensors, shards=2)
    return tensors
