"""config.json -> Step35Config on the released Step-3.5-Flash values, list/string variants and absent keys."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from step35_testing import LAYERS, RELEASED, TYPES

from bridgecore.errors import BridgeError
from bridgecore_step35 import provider_config, step35_model_config
from bridgecore_step35.provider import FULL


def test_released_config() -> None:
    cfg = provider_config(hf_config=RELEASED)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size) == (45, 4096, 11264, 128896)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (64, 8, 128)
    assert cfg.mtp_num_layers == 3 and cfg.max_sequence_length == 262144
    assert cfg.layer_types == TYPES and len(cfg.rotary_bases) == 48
    assert cfg.layernorm_zero_centered_gamma and cfg.qk_layernorm and cfg.attention_output_gate
    assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and not cfg.add_bias_linear
    assert cfg.params_dtype == torch.bfloat16 and cfg.bf16
    assert not cfg.share_embeddings_and_output_weights
    assert cfg.moe_layer_freq == [0, 0, 0] + [1] * 42
    assert (cfg.num_moe_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size) == (288, 8, 1280)
    assert cfg.moe_shared_expert_intermediate_size == 1280
    assert cfg.moe_router_score_function == "sigmoid" and cfg.moe_router_enable_expert_bias
    assert cfg.moe_router_topk_scaling_factor == 3.0 and cfg.moe_router_dtype == "fp32"
    assert cfg.llama3_rope == {
        "factor": 2.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 32.0,
        "original_max_position_embeddings": 131072.0,
    }


@pytest.mark.parametrize(
    ("index", "heads", "window", "base", "percent", "scaled", "limit", "limit_shared"),
    [
        (0, 64, None, 5e6, 0.5, True, None, None),
        (1, 96, (511, 0), 1e4, 1.0, False, None, None),
        (43, 96, (511, 0), 1e4, 1.0, False, 7.0, 16.0),
        (44, 64, None, 5e6, 0.5, True, 7.0, 16.0),
        (45, 96, (511, 0), 1e4, 1.0, False, None, None),  # MTP layer 0 follows the cycle
    ],
)
def test_per_layer_config(index, heads, window, base, percent, scaled, limit, limit_shared) -> None:
    cfg = step35_model_config(RELEASED)
    layer = cfg.layer_config(index)
    assert (layer.num_attention_heads, layer.num_query_groups, layer.kv_channels) == (heads, 8, 128)
    assert layer.window_size == window
    assert (layer.rotary_base, layer.rotary_percent, cfg.rope_scaled(index)) == (base, percent, scaled)
    assert (layer.swiglu_limit, layer.swiglu_limit_shared) == (limit, limit_shared)
    assert cfg.num_attention_heads == 64  # the model config is left alone


def test_moe_layers_enum_list_equals_string() -> None:
    as_list = {**RELEASED, "moe_layers_enum": list(range(3, LAYERS))}
    assert step35_model_config(as_list).moe_layer_freq == step35_model_config(RELEASED).moe_layer_freq
    spaced = {**RELEASED, "moe_layers_enum": "3, 4,5"}
    assert step35_model_config(spaced).moe_layer_freq == [0, 0, 0, 1, 1, 1] + [0] * 39


def test_step37_text_config_defaults() -> None:
    """A Step-3.7 text_config: no zero_centered, tie_word_embeddings, use_qk_norm, per-layer lists cut to 45."""
    text = copy.deepcopy(RELEASED)
    for key in (
        "zero_centered",
        "tie_word_embeddings",
        "use_qk_norm",
        "use_head_wise_attn_gate",
        "architectures",
        "moe_layers_enum",
        "swiglu_limits",
        "torch_dtype",
    ):
        del text[key]
    text["layer_types"] = TYPES[:LAYERS]
    text["rope_theta"] = text["rope_theta"][:LAYERS]
    text["partial_rotary_factors"] = text["partial_rotary_factors"][:LAYERS]
    text["swiglu_limits_shared"] = text["swiglu_limits_shared"][:LAYERS]
    cfg = step35_model_config(text, max_sequence_length=4096)
    assert cfg.layernorm_zero_centered_gamma and cfg.qk_layernorm and cfg.attention_output_gate
    assert not cfg.share_embeddings_and_output_weights and cfg.params_dtype == torch.bfloat16
    assert cfg.max_sequence_length == 4096  # overrides win
    assert cfg.moe_layer_freq == [0, 0, 0] + [1] * 42  # transformers' default: MoE from layer 3
    # MTP layers without their own entries: full type, rope of the first decoder layer of their type, no clamps.
    assert cfg.layer_types[LAYERS:] == [FULL] * 3
    assert cfg.rotary_bases[LAYERS:] == [5e6] * 3 and cfg.rotary_percents[LAYERS:] == [0.5] * 3
    assert cfg.swiglu_limits == [0.0] * 48 and cfg.swiglu_limits_shared[LAYERS:] == [0.0] * 3
    assert provider_config(hf_config=text) is not None  # model_type alone identifies it


def test_scalar_rope_and_no_moe() -> None:
    cfg = step35_model_config({**RELEASED, "rope_theta": 1e6, "use_moe": False, "moe_layers_enum": None})
    assert cfg.rotary_bases == [1e6] * 48 and cfg.num_moe_experts is None


def test_not_step35() -> None:
    assert provider_config(hf_config={"architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5"}) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layer_types": TYPES[:10]}, "layer_types (+ mtp_layer_types) has 10 entries"),
        ({"layer_types": TYPES[:45], "mtp_layer_types": [FULL]}, "has 46 entries"),
        ({"moe_num_experts": None}, "lacks moe_num_experts (or n_routed_experts)"),
        ({"layer_types": ["chunked_attention"] * 48}, "chunked_attention"),
        ({"rope_theta": [1e4] * 7}, "rope_theta has 7 entries"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling.rope_type is 'yarn'"),
        ({"moe_layers_enum": "3,45"}, "moe_layers_enum names layers [45]"),
        ({"moe_layers_enum": "3,x"}, "moe_layers_enum '3,x'"),
        ({"moe_router_activation": "relu"}, "moe_router_activation is 'relu'"),
        ({"norm_expert_weight": False}, "norm_expert_weight"),
        ({"sink": True}, "sink"),
        ({"torch_dtype": "float8"}, "torch_dtype is 'float8'"),
        ({"sliding_window": None}, "no sliding_window"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_rejected(change, message) -> None:
    cfg = {k: v for k, v in {**RELEASED, **change}.items() if v is not None}
    with pytest.raises(BridgeError, match=re.escape(message)):
        step35_model_config(cfg)


def _as_transformers_writes(released: dict) -> dict:
    """The text_config transformers' `Step3p7Config.save_pretrained` writes for a released text config."""
    from transformers import Step3p7Config

    return Step3p7Config(text_config=copy.deepcopy(released)).to_dict()["text_config"]


#: Step35Config fields that carry the numerics of the model.
_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "num_moe_experts",
    "moe_router_topk",
    "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size",
    "moe_layer_freq",
    "moe_router_topk_scaling_factor",
    "mtp_num_layers",
    "layer_types",
    "rotary_bases",
    "rotary_percents",
    "llama3_rope",
    "sliding_window",
    "sliding_num_attention_heads",
    "sliding_num_query_groups",
    "sliding_kv_channels",
    "swiglu_limits",
    "swiglu_limits_shared",
)


def test_transformers_spelling_means_the_released_model() -> None:
    """n_routed_experts, mlp_layer_types, rope_parameters per layer type, ... give the same config."""
    written = _as_transformers_writes(RELEASED)
    assert "moe_num_experts" not in written and "rope_theta" not in written and "moe_layers_enum" not in written
    assert set(written["rope_parameters"]) == {FULL, "sliding_attention"}
    ours, theirs = step35_model_config(RELEASED), step35_model_config(written)
    for name in _FIELDS:
        assert getattr(theirs, name) == getattr(ours, name), name
    assert [theirs.rope_scaled(i) for i in range(48)] == [ours.rope_scaled(i) for i in range(48)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_parameters.full_attention.rope_type": "yarn"}, "rope_parameters.full_attention.rope_type is 'yarn'"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e6}}, "one object per layer type"),
        ({"rope_parameters.full_attention.mscale": 1.0}, "rope_parameters.full_attention has ['mscale']"),
        ({"rope_parameters.sliding_attention.factor": 2.0}, "rope_parameters.sliding_attention has ['factor']"),
        ({"rope_theta": 1e4}, "rope_theta and rope_parameters describe different ropes"),
        ({"yarn_only_types": ["sliding_attention"]}, "yarn_only_types and rope_parameters"),
        ({"query_pre_attn_scalar": 64}, "query_pre_attn_scalar is 64"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"attention_bias": True}, "attention_bias"),
        ({"gating": "per-channel"}, "gating is 'per-channel'"),
        ({"per_layer_config": {"1": {"num_attention_heads": 64}}}, "per_layer_config.1.num_attention_heads is 64"),
        ({"per_layer_config": {"1": {"head_dim": 64}}}, "per_layer_config.1 overrides ['head_dim']"),
        ({"mlp_layer_types": ["sparse"] * 44}, "mlp_layer_types"),
        ({"mtp_mlp_layer_types": ["sparse"] * 3}, "mtp_mlp_layer_types"),
        ({"moe_layers_enum": "4,5"}, "moe_layers_enum ('4,5') and mlp_layer_types"),
        ({"moe_num_experts": 7}, "moe_num_experts (7) and n_routed_experts (288) disagree"),
        ({"num_attention_groups": 4}, "disagree"),
    ],
)
def test_transformers_spelling_rejected(change, message) -> None:
    """A key transformers writes that we cannot honour, or that contradicts another, is named."""
    cfg = _as_transformers_writes(RELEASED)
    for key, value in change.items():
        *path, last = key.split(".")
        target = cfg
        for part in path:
            target = target[part]
        target[last] = value
    with pytest.raises(BridgeError, match=re.escape(message)):
        step35_model_config(cfg)
