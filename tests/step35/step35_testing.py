"""Shared test data: the released Step-3.5-Flash config.json, and a checkpoint reader."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from bridgecore_step35.provider import FULL, SLIDING

LAYERS, MTP = 45, 3
TYPES = [FULL, SLIDING, SLIDING, SLIDING] * 12

# The released config.json (reference hf_layouts §1.1), MTP entries included in the per-layer lists.
RELEASED = {
    "architectures": ["Step3p5ForCausalLM"],
    "model_type": "step3p5",
    "hidden_size": 4096,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 64,
    "num_attention_groups": 8,
    "head_dim": 128,
    "attention_other_setting": {
        "attention_type": SLIDING,
        "num_attention_heads": 96,
        "num_attention_groups": 8,
        "head_dim": 128,
    },
    "layer_types": TYPES,
    "sliding_window": 512,
    "rope_theta": [5e6 if t == FULL else 1e4 for t in TYPES],
    "partial_rotary_factors": [0.5 if t == FULL else 1.0 for t in TYPES],
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 2.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 32.0,
        "original_max_position_embeddings": 131072,
    },
    "yarn_only_types": [FULL],
    "max_position_embeddings": 262144,
    "vocab_size": 128896,
    "intermediate_size": 11264,
    "moe_num_experts": 288,
    "moe_top_k": 8,
    "moe_intermediate_size": 1280,
    "share_expert_dim": 1280,
    "moe_layers_enum": ",".join(str(i) for i in range(3, LAYERS)),
    "moe_router_activation": "sigmoid",
    "use_moe_router_bias": True,
    "moe_router_scaling_factor": 3.0,
    "norm_expert_weight": True,
    "need_fp32_gate": True,
    "use_qk_norm": True,
    "use_head_wise_attn_gate": True,
    "zero_centered": True,
    "swiglu_limits": [7.0 if i in (43, 44) else 0.0 for i in range(LAYERS + MTP)],
    "swiglu_limits_shared": [16.0 if i in (43, 44) else 0.0 for i in range(LAYERS + MTP)],
    "num_nextn_predict_layers": MTP,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "att_impl_type": "GQA",
    "use_moe": True,
    "use_rope_layers": [],
    "sink": False,
}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out
