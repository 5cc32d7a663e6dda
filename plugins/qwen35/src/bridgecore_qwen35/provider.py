"""config.json (Qwen3.5 / Qwen3.6, text-only or vision-language) -> the Megatron-Core config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bridgecore.plugin import BridgeError, ModelConfig
from bridgecore_qwen35.gdn import torch_gdn_kernels

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Qwen35Config(ModelConfig):
    """A ModelConfig whose model keeps the GDN decay and norm params in fp32.

    ``A_log``, ``dt_bias`` and the GDN output norm are tiny ([v-heads] and [value head dim] per
    layer); the released checkpoints keep ``A_log`` in fp32, and the norm goes through a -1 shift
    that bf16 could not always carry exactly. Keeping these params fp32 makes import and export exact
    whatever the checkpoint stores; GatedDeltaNet computes with them in fp32 anyway.
    """

    def build_model(
        self, spec: Any, mtp_spec: Any, *, pre_process: bool, post_process: bool, vp_stage: int | None
    ) -> torch.nn.Module:
        from megatron.core.ssm.gated_delta_net import GatedDeltaNet

        with torch_gdn_kernels():
            model = super().build_model(
                spec, mtp_spec, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage
            )
        for module in model.modules():
            if isinstance(module, GatedDeltaNet):
                for param in (module.A_log, module.dt_bias, module.out_norm.weight):
                    param.data = param.data.float()
                # GatedDeltaNet marks these TP-split without saying along which dim (it is 0).
                for param in (module.A_log, module.dt_bias, module.conv1d.weight):
                    param.partition_dim, param.partition_stride = 0, 1
        return model

    def forward_logits(self, model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        with torch_gdn_kernels():
            return super().forward_logits(model, input_ids)


def text_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: nested under `text_config` in the VL checkpoints."""
    return hf_config.get("text_config") or hf_config


def layer_types(text: dict[str, Any]) -> list[str]:
    """`layer_types`, or the pattern older configs give as `full_attention_interval` (default 4)."""
    layers = text["num_hidden_layers"]
    types = text.get("layer_types")
    if types is None:
        interval = text.get("full_attention_interval", 4)
        return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]
    if len(types) != layers or set(types) - {"full_attention", "linear_attention"}:
        raise BridgeError(
            f"config.json layer_types: expected {layers} entries of full_attention/linear_attention, got {types}"
        )
    return list(types)


#: the `rope_parameters` keys of a default rope. The mrope keys only place image and video tokens
#: (the language model's text positions are the same on all three axes), which are not converted.
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved"}


def _rope(text: dict[str, Any]) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from `rope_parameters` (transformers 5) or the legacy keys.

    A rope type other than default, or a key a default rope does not have, is an error naming it;
    a legacy key beside `rope_parameters` must agree with it.
    """
    key = "rope_parameters" if text.get("rope_parameters") is not None else "rope_scaling"
    rope = dict(text.get(key) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise BridgeError(f"config.json {key}.rope_type is {rope_type!r}; only 'default' is supported")
    unknown = sorted(set(rope) - _ROPE_KEYS)
    if unknown:
        raise BridgeError(f"config.json {key} has {unknown}, which a default rope does not use")
    for name in ("rope_theta", "partial_rotary_factor"):
        if name in rope and text.get(name) is not None and float(text[name]) != float(rope[name]):
            raise BridgeError(f"config.json {name} ({text[name]}) and {key}.{name} ({rope[name]}) disagree")
    theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    return float(theta), float(partial)


def _require(text: dict[str, Any], key: str, expected: Any, default: Any) -> None:
    value = text.get(key, default)
    if value != expected:
        raise BridgeError(f"config.json {key} is {value!r}; the Qwen3.5 converter supports only {expected!r}")


def _dtype(hf_config: dict[str, Any], text: dict[str, Any]) -> torch.dtype:
    name = text.get("dtype") or text.get("torch_dtype") or hf_config.get("dtype") or hf_config.get("torch_dtype")
    name = name or "bfloat16"
    if name not in _DTYPES:
        raise BridgeError(f"config.json dtype is {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def qwen35_config(hf_config: dict[str, Any]) -> Qwen35Config:
    text = text_config(hf_config)
    _require(text, "hidden_act", "silu", "silu")
    _require(text, "attention_bias", False, False)
    # transformers' Qwen3.5 attention always gates its output; the keys are there in Qwen's own configs.
    _require(text, "attn_output_gate", True, True)
    _require(text, "output_gate_type", "swish", "swish")
    theta, partial = _rope(text)
    dtype = _dtype(hf_config, text)
    linear = [t == "linear_attention" for t in layer_types(text)]
    tied = hf_config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    mtp_layers = text.get("mtp_num_hidden_layers", 0)
    if mtp_layers > 1:
        # The HF layout names the MTP fc and norms without a layer index: one MTP layer is all it holds.
        raise BridgeError(f"config.json mtp_num_hidden_layers is {mtp_layers}; the Qwen3.5 layout holds at most 1")
    fields: dict[str, Any] = {
        "num_layers": text["num_hidden_layers"],
        "hidden_size": text["hidden_size"],
        "num_attention_heads": text["num_attention_heads"],
        "num_query_groups": text["num_key_value_heads"],
        "kv_channels": text.get("head_dim", text["hidden_size"] // text["num_attention_heads"]),
        "ffn_hidden_size": text.get("intermediate_size", text.get("moe_intermediate_size")),
        "normalization": "RMSNorm",
        "layernorm_epsilon": text.get("rms_norm_eps", 1e-6),
        "layernorm_zero_centered_gamma": True,
        "gated_linear_unit": True,
        "activation_func": torch.nn.functional.silu,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "qk_layernorm": True,
        "attention_output_gate": True,
        "experimental_attention_variant": "gated_delta_net",
        "linear_attention_freq": [int(x) for x in linear],
        "linear_conv_kernel_dim": text.get("linear_conv_kernel_dim", 4),
        "linear_key_head_dim": text.get("linear_key_head_dim", 128),
        "linear_value_head_dim": text.get("linear_value_head_dim", 128),
        "linear_num_key_heads": text.get("linear_num_key_heads", 16),
        "linear_num_value_heads": text.get("linear_num_value_heads", 32),
        "position_embedding_type": "rope",
        "rotary_percent": partial,
        "rotary_base": theta,
        "vocab_size": text["vocab_size"],
        "max_sequence_length": text.get("max_position_embeddings", 4096),
        "share_embeddings_and_output_weights": bool(tied),
        "mtp_num_layers": mtp_layers or None,
        "params_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "hf_config": hf_config,
    }
    if text.get("num_experts"):
        fields.update(
            num_moe_experts=text["num_experts"],
            moe_router_topk=text.get("num_experts_per_tok", 8),
            moe_ffn_hidden_size=text["moe_intermediate_size"],
            moe_shared_expert_intermediate_size=text.get("shared_expert_intermediate_size"),
            moe_shared_expert_gate=True,
            moe_router_score_function="softmax",
            moe_router_pre_softmax=False,
            moe_layer_freq=1,
            moe_aux_loss_coeff=text.get("router_aux_loss_coef", 0.0),
        )
    if mtp_layers:
        fields["mtp_loss_scaling_factor"] = 0.1
    return Qwen35Config(**fields)
