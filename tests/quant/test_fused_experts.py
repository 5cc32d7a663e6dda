"""ModelOpt's amax of transformers' fused experts through the in-memory bridge: one input amax per
layer is every Megatron expert's input quantizer; export writes it once and refuses diverged copies.

The tiny Qwen3.5 MoE gets, beside its per-expert weights, the expert amax as ModelOpt's
``save_pretrained`` names them (checked against ModelOpt itself in ``test_modelopt_interop.py``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_cli_e2e import load_dir, write_family_tiny

from bridgecore.errors import BridgeError


def with_fused_expert_amax(src: Path, out: Path) -> dict[str, torch.Tensor]:
    tensors = load_dir(src)
    g = torch.Generator().manual_seed(0)
    layers = sorted({k.split(".")[2] for k in tensors if ".mlp.experts.0.gate_proj." in k})
    experts = len({k.split(".")[5] for k in tensors if k.startswith("model.layers.0.mlp.experts.")})
    for n in layers:
        p = f"model.layers.{n}.mlp.experts."
        for fused in ("gate_up_proj", "down_proj"):
            for e in range(experts):
                tensors[f"{p}{fused}_weight_quantizers.{e}._amax"] = (torch.rand((), generator=g) + 0.1).bfloat16()
            tensors[f"{p}{fused}_input_quantizer._amax"] = (torch.rand((), generator=g) + 1).bfloat16()
    out.mkdir()
    save_file(tensors, out / "model.safetensors")
    shutil.copy(src / "config.json", out / "config.json")
    return tensors


def test_shared_input_amax_is_written_once_and_diverged_copies_are_refused(tmp_path: Path) -> None:
    from bridgecore import AutoBridge, export_hf_weights
    from bridgecore.megatron import parallel

    write_family_tiny("qwen35-moe", tmp_path / "tiny")
    tensors = with_fused_expert_amax(tmp_path / "tiny", tmp_path / "calibrated")
    bridge = AutoBridge.from_hf_pretrained(tmp_path / "calibrated")
    try:
        model = bridge.to_megatron_model()
        exported = dict(export_hf_weights(bridge, model))
        assert sorted(exported) == sorted(tensors)
        assert all(torch.equal(exported[k], v) for k, v in tensors.items())
        quantizer = "decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.input_quantizer"
        model[0].get_submodule(quantizer)._amax.mul_(2)
        diverged = r"layers\.1\.mlp\.experts\.down_proj_input_quantizer\._amax: .* expert 2 differ from expert 0's"
        with pytest.raises(BridgeError, match=diverged):
            dict(export_hf_weights(bridge, model))
        with pytest.raises(BridgeError, match=diverged):
            bridge.save_hf_pretrained(model, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    finally:
        parallel.leave()
