"""config.json -> Megatron config, including the key spellings of older and newer transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from qwen35_testing import read_config

import bridgecore_qwen35 as plugin
from bridgecore.errors import BridgeError
from bridgecore_qwen35 import tiny


def _config(tmp_path, write) -> dict:
    write(tmp_path)
    return read_config(tmp_path)


def test_dense_config(tmp_path) -> None:
    c = plugin.provider_config(hf_config=_config(tmp_path, tiny.write_dense))
    assert c.linear_attention_freq == [1, 1, 1, 0]
    assert (c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim) == (
        2,
        4,
        16,
        16,
    )
    assert c.linear_conv_kernel_dim == 4
    assert c.attention_output_gate and c.qk_layernorm and c.layernorm_zero_centered_gamma
    assert (c.num_attention_heads, c.num_query_groups, c.kv_channels, c.ffn_hidden_size) == (4, 2, 16, 128)
    assert c.rotary_percent == 0.25 and c.rotary_base == 1e7
    assert c.share_embeddings_and_output_weights
    assert c.mtp_num_layers == 1 and c.num_moe_experts is None
    assert c.params_dtype == torch.bfloat16


def test_vl_moe_config_reads_text_config(tmp_path) -> None:
    c = plugin.provider_config(hf_config=_config(tmp_path, tiny.write_moe_vl))
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size) == (4, 2, 32)
    assert c.moe_shared_expert_intermediate_size == 32 and c.moe_shared_expert_gate
    assert c.moe_router_score_function == "softmax" and not c.moe_router_pre_softmax
    assert not c.share_embeddings_and_output_weights
    assert c.vocab_size == 128 and c.hidden_size == 64


def test_legacy_keys(tmp_path) -> None:
    """Configs without layer_types / rope_parameters (before transformers 5.5) mean the same model."""
    hf = _config(tmp_path, tiny.write_moe)
    legacy = copy.deepcopy(hf)
    del legacy["layer_types"], legacy["rope_parameters"]
    legacy["rope_theta"] = 1e7
    new, old = plugin.provider_config(hf_config=hf), plugin.provider_config(hf_config=legacy)
    for field in ("linear_attention_freq", "rotary_base", "rotary_percent"):
        assert getattr(new, field) == getattr(old, field)


def test_missing_interval_defaults_to_four(tmp_path) -> None:
    hf = _config(tmp_path, tiny.write_dense)
    del hf["layer_types"], hf["full_attention_interval"]
    hf["num_hidden_layers"] = 8
    assert plugin.provider_config(hf_config=hf).linear_attention_freq == [1, 1, 1, 0, 1, 1, 1, 0]


def test_explicit_layer_types_win(tmp_path) -> None:
    hf = _config(tmp_path, tiny.write_dense)
    hf["layer_types"] = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
    assert plugin.provider_config(hf_config=hf).linear_attention_freq == [1, 0, 1, 0]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("attn_output_gate", False, "attn_output_gate"),
        ("attention_bias", True, "attention_bias"),
        ("mtp_num_hidden_layers", 2, "mtp_num_hidden_layers"),
        ("layer_types", ["full_attention"], "layer_types"),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6}, "rope_type"),
        ("rope_parameters", {"rope_type": "default", "rope_theta": 1e7, "factor": 4.0}, r"has \['factor'\]"),
        ("partial_rotary_factor", 0.5, r"partial_rotary_factor \(0.5\) and rope_parameters"),
    ],
)
def test_unsupported_values_are_one_line_errors(tmp_path, key, value, message) -> None:
    hf = _config(tmp_path, tiny.write_dense)
    hf[key] = value
    with pytest.raises(BridgeError, match=message):
        plugin.provider_config(hf_config=hf)


def test_other_architectures_are_declined() -> None:
    assert plugin.provider_config(hf_config={"architectures": ["LlamaForCausalLM"]}) is None
    assert "Qwen3_5MoeForConditionalGeneration" in plugin.architectures()


@pytest.mark.parametrize("write", [tiny.write_dense, tiny.write_moe_vl])
def test_config_as_transformers_writes_it(tmp_path, write) -> None:
    """transformers' own config classes re-save our configs (rope_parameters with mrope keys, layer_types,
    nested text_config); the Megatron config is the same."""
    import transformers

    hf = _config(tmp_path, write)
    vl = "text_config" in hf
    cls = transformers.AutoConfig.for_model(hf["model_type"]).__class__
    fields = {k: v for k, v in hf.items() if k not in ("architectures", "model_type")}
    written = {**cls(**fields).to_dict(), "architectures": hf["architectures"]}
    assert ("text_config" in written) == vl and "rope_parameters" in (written.get("text_config") or written)
    ours, theirs = plugin.provider_config(hf_config=hf), plugin.provider_config(hf_config=written)
    for field in (
        "linear_attention_freq",
        "rotary_base",
        "rotary_percent",
        "num_moe_experts",
        "share_embeddings_and_output_weights",
        "mtp_num_layers",
        "kv_channels",
        "params_dtype",
    ):
        assert getattr(theirs, field) == getattr(ours, field), field
