"""A tiny Step-3.5 checkpoint that keeps every structural feature of the released one.

Full then three sliding layers with different head counts (4 vs 6, 2 KV groups), two dense then two
MoE layers (4 experts, top-2, shared expert, fp32 router bias), two MTP layers (full, then sliding)
with their own output heads, per-layer rope theta and partial rotary factor, llama3 scaling on full
layers, zero-centered norms, q/k norms, the head-wise gate, and SwiGLU clamps on some layers. The
clamps are small because the tiny activations are small: they must bite to be tested.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bridgecore.plugin import TinyModel, random_tensor, write_checkpoint
from bridgecore_step35.provider import FULL, SLIDING, step35_model_config

TINY_CONFIG: dict[str, Any] = {
    "architectures": ["Step3p5ForCausalLM"],
    "model_type": "step3p5",
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_attention_groups": 2,
    "head_dim": 16,
    "attention_other_setting": {
        "attention_type": SLIDING,
        "num_attention_heads": 6,
        "num_attention_groups": 2,
        "head_dim": 16,
        "true_head_dim": 16,
    },
    "layer_types": [FULL, SLIDING, SLIDING, SLIDING, FULL, SLIDING],
    "sliding_window": 4,
    "rope_theta": [50000.0, 10000.0, 10000.0, 10000.0, 50000.0, 10000.0],
    "partial_rotary_factors": [0.5, 1.0, 1.0, 1.0, 0.5, 1.0],
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 2.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 32.0,
        "original_max_position_embeddings": 256,
    },
    "yarn_only_types": [FULL],
    "max_position_embeddings": 1024,
    "max_seq_len": 1024,
    "vocab_size": 128,
    "intermediate_size": 96,
    "moe_num_experts": 4,
    "moe_top_k": 2,
    "moe_intermediate_size": 32,
    "share_expert_dim": 48,
    "moe_layers_enum": "2,3",
    "moe_router_activation": "sigmoid",
    "use_moe_router_bias": True,
    "moe_router_scaling_factor": 3.0,
    "norm_expert_weight": True,
    "need_fp32_gate": True,
    "use_qk_norm": True,
    "use_head_wise_attn_gate": True,
    "zero_centered": True,
    "swiglu_limits": [0.0, 0.0, 0.0, 0.25, 0.0, 0.0],
    "swiglu_limits_shared": [0.0, 0.3, 0.0, 0.3, 0.0, 0.0],
    "num_nextn_predict_layers": 2,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": [1, 2],
    "torch_dtype": "bfloat16",
    "att_impl_type": "GQA",
    "use_moe": True,
    "moe_layer_offset": 0,
    "moe_every_n_layer": 1,
    "use_rope_layers": [],
    "sink": False,
}


def step35_tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor of a released-layout Step-3.5 checkpoint of config `cfg`."""
    config = step35_model_config(cfg)
    h, vocab, layers, mtp = config.hidden_size, config.vocab_size, config.num_layers, config.mtp_num_layers or 0
    bf16, fp32 = torch.bfloat16, torch.float32
    moe = {i for i in range(layers) if config.num_moe_experts and config.moe_layer_freq[i]}
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"model.embed_tokens.weight": ((vocab, h), bf16)}
    for i in range(layers + mtp):
        p = f"model.layers.{i}."
        layer = config.layer_config(i)
        heads, groups, d = layer.num_attention_heads, layer.num_query_groups, layer.kv_channels
        out |= {
            f"{p}input_layernorm.weight": ((h,), bf16),
            f"{p}post_attention_layernorm.weight": ((h,), bf16),
            f"{p}self_attn.q_proj.weight": ((heads * d, h), bf16),
            f"{p}self_attn.k_proj.weight": ((groups * d, h), bf16),
            f"{p}self_attn.v_proj.weight": ((groups * d, h), bf16),
            f"{p}self_attn.o_proj.weight": ((h, heads * d), bf16),
        }
        if config.qk_layernorm:
            out |= {f"{p}self_attn.q_norm.weight": ((d,), bf16), f"{p}self_attn.k_norm.weight": ((d,), bf16)}
        if config.attention_output_gate:
            out[f"{p}self_attn.g_proj.weight"] = ((heads, h), bf16)
        if i in moe:
            e, inter = config.num_moe_experts, config.moe_ffn_hidden_size
            out |= {
                f"{p}moe.gate.weight": ((e, h), bf16),
                f"{p}moe.gate_proj.weight": ((e, inter, h), bf16),
                f"{p}moe.up_proj.weight": ((e, inter, h), bf16),
                f"{p}moe.down_proj.weight": ((e, h, inter), bf16),
            }
            if config.moe_router_enable_expert_bias:
                out[f"{p}moe.router_bias"] = ((e,), fp32)
            shared = config.moe_shared_expert_intermediate_size
            if shared:
                out |= {
                    f"{p}share_expert.gate_proj.weight": ((shared, h), bf16),
                    f"{p}share_expert.up_proj.weight": ((shared, h), bf16),
                    f"{p}share_expert.down_proj.weight": ((h, shared), bf16),
                }
        else:
            inter = config.ffn_hidden_size
            out |= {
                f"{p}mlp.gate_proj.weight": ((inter, h), bf16),
                f"{p}mlp.up_proj.weight": ((inter, h), bf16),
                f"{p}mlp.down_proj.weight": ((h, inter), bf16),
            }
        if i >= layers:
            out |= {
                f"{p}enorm.weight": ((h,), bf16),
                f"{p}hnorm.weight": ((h,), bf16),
                f"{p}eh_proj.weight": ((h, 2 * h), bf16),
                f"{p}transformer.shared_head.norm.weight": ((h,), bf16),
                f"{p}transformer.shared_head.output.weight": ((vocab, h), bf16),
            }
    out["model.norm.weight"] = ((h,), bf16)
    if not config.share_embeddings_and_output_weights:
        out["lm_head.weight"] = ((vocab, h), bf16)
    return out


def _std(name: str, shape: tuple[int, ...]) -> float:
    """Scale so activations stay near unit size: 1/sqrt(fan-in) for matrices, small offsets for norms."""
    if name.endswith("router_bias"):
        return 0.1
    if len(shape) == 1:
        return 0.1  # zero-centered norm weights: the scale is 1 + w
    return shape[-1] ** -0.5


def write_tiny(out: Path, seed: int = 0) -> None:
    """Write the tiny checkpoint (config.json, two safetensors shards and the index) into `out`."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: random_tensor(shape, dtype, generator, std=_std(name, shape))
        for name, (shape, dtype) in step35_tensor_shapes(TINY_CONFIG).items()
    }
    write_checkpoint(out, TINY_CONFIG, tensors, shards=2)


TINY = TinyModel(
    "step35",
    "Step-3.5-Flash in miniature: full/sliding attention with 4/6 heads, dense then MoE layers, 2 MTP layers",
    write_tiny,
)
