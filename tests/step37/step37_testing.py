"""Shared test data: the released Step-3.7 config.json (reference hf_layouts §2.1)."""

from __future__ import annotations

from typing import Any

FULL, SLIDING = "full_attention", "sliding_attention"
LAYERS, MTP = 45, 3
TYPES = [FULL, SLIDING, SLIDING, SLIDING] * 12

#: The text_config as released: no zero_centered, tie_word_embeddings or use_qk_norm; MTP entries in
#: the per-layer lists.
RELEASED_TEXT: dict[str, Any] = {
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
    "need_fp32_gate": True,
    "use_head_wise_attn_gate": True,
    "num_nextn_predict_layers": MTP,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
}

RELEASED: dict[str, Any] = {
    "architectures": ["Step3p7ForConditionalGeneration"],
    "model_type": "step3p7",
    "image_token_id": 128001,
    "understand_projector_stride": 2,
    "projector_bias": False,
    "hidden_size": 4096,
    "max_position_embeddings": 262144,
    "text_config": RELEASED_TEXT,
    "vision_config": {
        "model_type": "perception_encoder",
        "width": 1536,
        "layers": 47,
        "heads": 16,
        "patch_size": 14,
        "image_size": 728,
        "mlp_ratio": 8960 / 1536,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "use_cls_token": False,
        "use_ln_pre": True,
        "use_ln_post": False,
        "use_abs_posemb": True,
        "use_rope2d": True,
        "ls_init_value": 0.1,
        "num_channels": 3,
    },
}
