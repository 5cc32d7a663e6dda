"""Make a tiny checkpoint look ModelOpt-calibrated (max calibration): per-tensor amax on every linear.

As ModelOpt calibrates each HF linear on its own, a weight amax is the largest |w| of its linear, so
the linears Megatron fuses into one quantizer (q/k/v/g, gate/up, GDN in_proj parts) differ; stacked
experts ``[E, ...]`` get one per expert, ``[E]``. Linears that read one input share its input amax,
a random positive value (no activations are run), as do the k/v bmm amax of attention. GDN
``in_proj_a``/``in_proj_b`` get none: ModelOpt's recipes leave them unquantized.
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
    r"|in_proj_[ab]\."
)
_FUSED = re.compile(r"\.(q|k|v|g)_proj$|\.(gate|up)_proj$|\.in_proj_(qkv|z|b|a)$")


def _quantizer_group(module: str) -> str:
    # q/k/v(/g), gate/up and the GDN in_proj parts read one input (and Megatron fuses them).
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
    g = torch.Generator().manual_seed(seed)
    input_amax: dict[str, torch.Tensor] = {}
    for module, weight in linears.items():
        amax = weight.float().abs().flatten(-2).amax(-1)  # [] per linear, [E] per stacked expert
        group = _quantizer_group(module)
        input_amax.setdefault(group, torch.rand(amax.shape, generator=g) + 0.1)
        tensors[f"{module}.weight_quantizer._amax"] = amax
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
