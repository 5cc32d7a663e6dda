"""A complete bridgecore plugin for Llama-style checkpoints, written only against the public hooks.

A plugin is its config translation and its mappings: naming transformers' class (``transformers_models``)
claims the architecture and gets the core's tiny model and ``verify`` reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bridgecore.plugin import BridgeError, TransformersModel, hookimpl

if TYPE_CHECKING:  # imported in the hooks, so that `bridgecore plugins` imports no torch
    from bridgecore.plugin import Mapping, ModelConfig

_DTYPES = ("bfloat16", "float16", "float32")

#: the tiny model's config: transformers' LlamaConfig keys (2-layer GQA, bf16).
TINY_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
}


@hookimpl
def transformers_models() -> list[TransformersModel]:
    return [TransformersModel("LlamaForCausalLM", TINY_CONFIG, "llama-example", "2-layer GQA Llama (example plugin)")]


def _require(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg:
        raise BridgeError(f"config.json: key {key!r} is missing; a Llama config needs it")
    return cfg[key]


@hookimpl
def provider_config(hf_config: dict[str, Any]) -> ModelConfig:
    heads, hidden = _require(hf_config, "num_attention_heads"), _require(hf_config, "hidden_size")
    rope = hf_config.get("rope_parameters") or {}
    dtype_name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if dtype_name not in _DTYPES:
        raise BridgeError(f"config.json: dtype {dtype_name!r} is not one of {sorted(_DTYPES)}")
    import torch

    from bridgecore.plugin import ModelConfig

    dtype = getattr(torch, dtype_name)
    return ModelConfig(
        num_layers=_require(hf_config, "num_hidden_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads", heads),
        kv_channels=hf_config.get("head_dim") or hidden // heads,
        ffn_hidden_size=_require(hf_config, "intermediate_size"),
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        vocab_size=_require(hf_config, "vocab_size"),
        max_sequence_length=hf_config.get("max_position_embeddings", 4096),
        rotary_base=rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)),
        share_embeddings_and_output_weights=bool(hf_config.get("tie_word_embeddings", False)),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
    )


@hookimpl
def layer_spec(config: ModelConfig, vp_stage: int | None) -> Any:
    from bridgecore.plugin import gpt_block_spec  # megatron-core loads only when a model is built

    return gpt_block_spec(config, vp_stage)


@hookimpl
def mappings(config: ModelConfig) -> list[Mapping]:
    from bridgecore.plugin import ColumnParallel, FusedQKV, GatedMLP, Replicated, RowParallel

    layer, hf_layer = "decoder.layers.{layer}.", "model.layers.{layer}."
    table: list[Mapping] = [
        ColumnParallel("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        Replicated("decoder.final_layernorm.weight", "model.norm.weight"),
        Replicated(layer + "input_layernorm.weight", hf_layer + "input_layernorm.weight"),
        FusedQKV(
            layer + "self_attention.linear_qkv.weight",
            *(hf_layer + f"self_attn.{p}_proj.weight" for p in "qkv"),
            heads=config.num_attention_heads,
            groups=config.num_query_groups,
            head_dim=config.kv_channels,
        ),
        RowParallel(layer + "self_attention.linear_proj.weight", hf_layer + "self_attn.o_proj.weight"),
        Replicated(layer + "pre_mlp_layernorm.weight", hf_layer + "post_attention_layernorm.weight"),
        GatedMLP(layer + "mlp.linear_fc1.weight", hf_layer + "mlp.gate_proj.weight", hf_layer + "mlp.up_proj.weight"),
        RowParallel(layer + "mlp.linear_fc2.weight", hf_layer + "mlp.down_proj.weight"),
    ]
    if not config.share_embeddings_and_output_weights:
        table.append(ColumnParallel("output_layer.weight", "lm_head.weight"))
    return table
