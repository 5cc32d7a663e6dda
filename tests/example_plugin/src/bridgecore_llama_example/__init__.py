"""A complete bridgecore plugin for Llama-style checkpoints, written only against the public hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bridgecore.errors import BridgeError
from bridgecore.hookspecs import hookimpl
from bridgecore.mapping import ColumnParallel, FusedQKV, GatedMLP, Mapping, Replicated, RowParallel
from bridgecore.megatron.config import ModelConfig
from bridgecore.tiny import TinyModel, random_tensor, write_checkpoint

ARCHITECTURE = "LlamaForCausalLM"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _require(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg:
        raise BridgeError(f"config.json: key {key!r} is missing; a Llama config needs it")
    return cfg[key]


def _owns(cfg: dict[str, Any]) -> bool:
    return (cfg.get("architectures") or [None])[0] == ARCHITECTURE


@hookimpl
def architectures() -> list[str]:
    return [ARCHITECTURE]


@hookimpl
def provider_config(hf_config: dict[str, Any]) -> ModelConfig | None:
    if not _owns(hf_config):
        return None
    heads = _require(hf_config, "num_attention_heads")
    hidden = _require(hf_config, "hidden_size")
    rope = hf_config.get("rope_parameters") or {}
    dtype_name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if dtype_name not in _DTYPES:
        raise BridgeError(f"config.json: dtype {dtype_name!r} is not one of {sorted(_DTYPES)}")
    dtype = _DTYPES[dtype_name]
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
    if not _owns(config.hf_config):
        return None
    from bridgecore.megatron.specs import gpt_block_spec

    return gpt_block_spec(config, vp_stage)


@hookimpl
def mappings(config: ModelConfig, hf_keys: frozenset[str]) -> list[Mapping] | None:
    if not _owns(config.hf_config):
        return None
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


TINY_CONFIG = {
    "architectures": [ARCHITECTURE],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "dtype": "bfloat16",
}


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama checkpoint with config ``cfg``, in HF order, with its shape."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    shapes["model.norm.weight"] = (h,)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def write_tiny(out: Path, seed: int = 0) -> None:
    """A random tiny Llama checkpoint in the HF layout (bf16, two shards)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        name: random_tensor(shape, torch.bfloat16, g, std=1.0 if len(shape) == 1 else 0.02)
        for name, shape in tensor_shapes(TINY_CONFIG).items()
    }
    for name, t in tensors.items():
        if name.endswith("norm.weight"):
            tensors[name] = (1 + 0.1 * t.float()).to(torch.bfloat16)
    write_checkpoint(out, TINY_CONFIG, tensors, shards=2)


@hookimpl
def tiny_models() -> list[TinyModel]:
    return [TinyModel("llama-example", "2-layer GQA Llama (third-party example plugin)", write_tiny)]


@hookimpl
def hf_reference(hf_config: dict[str, Any]) -> Any:
    if not _owns(hf_config):
        return None

    def logits(hf_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
        from safetensors.torch import load_file
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**{k: v for k, v in hf_config.items() if k not in ("architectures", "dtype")})
        model = LlamaForCausalLM(config).float().eval()
        state = {}
        for file in sorted(Path(hf_dir).glob("*.safetensors")):
            state |= {k: t.float() for k, t in load_file(file).items()}
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            return model(input_ids=input_ids).logits

    return logits
