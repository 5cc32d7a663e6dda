"""Step-3.5 config.json -> Megatron-Core config, with the per-layer fields the layers read.

Step-3.5 is heterogeneous per layer: full-attention layers have `num_attention_heads` heads, sliding
layers the heads/groups/head dim of `attention_other_setting`; rope base, rotary fraction and the
SwiGLU clamps are per-layer lists; llama3 rope scaling applies only to the layer types listed in
`yarn_only_types`. `Step35Config` keeps these lists for the decoder *and* the MTP layers (MTP layer j
is layer `num_layers + j`), and `layer_config(i)` gives the config layer i is built from.

Keys the Step-3.7 `text_config` may lack take the documented defaults of `step35_model_config`.

Two spellings are read: the released one (`moe_num_experts`, `moe_layers_enum`, per-layer
`rope_theta` and `partial_rotary_factors`, `rope_scaling` on `yarn_only_types`,
`attention_other_setting`), and the one transformers 5 writes on `save_pretrained`
(`Step3p7TextConfig`: `n_routed_experts`, `num_experts_per_tok`, `num_key_value_heads`,
`mlp_layer_types`, `num_sliding_attention_heads`, `per_layer_config`, and `rope_parameters` with one
object per layer type). Where both spell one thing they must agree, and a transformers key whose
value we cannot honour (a rope type other than default/llama3, a softmax scale other than
head_dim**-0.5, bidirectional attention, biases) is an error naming it, never a silent default.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from bridgecore.plugin import BridgeError, ModelConfig

FULL, SLIDING = "full_attention", "sliding_attention"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class Step35Config(ModelConfig):
    #: attention type of every layer, decoder layers then MTP layers.
    layer_types: list[str] = field(default_factory=list)
    rotary_bases: list[float] = field(default_factory=list)
    rotary_percents: list[float] = field(default_factory=list)
    #: llama3 rope scaling parameters (`_LLAMA3_KEYS`), applied to the layer types below only.
    llama3_rope: dict[str, float] | None = None
    llama3_layer_types: list[str] = field(default_factory=list)
    #: HF sliding window: a query attends to itself and the `sliding_window - 1` tokens before it.
    sliding_window: int | None = None
    sliding_num_attention_heads: int = 0
    sliding_num_query_groups: int = 0
    sliding_kv_channels: int = 0
    #: per-layer SwiGLU clamps, 0 = none: routed experts, and every other MLP (shared expert, dense).
    swiglu_limits: list[float] = field(default_factory=list)
    swiglu_limits_shared: list[float] = field(default_factory=list)
    #: the clamps of one layer; set on the copies `layer_config` returns.
    swiglu_limit: float | None = None
    swiglu_limit_shared: float | None = None

    def layer_config(self, index: int) -> Step35Config:
        """The config layer `index` (0-based, MTP layers after the decoder's) is built from."""
        if not 0 <= index < len(self.layer_types):
            raise BridgeError(f"layer {index} is outside the {len(self.layer_types)} layers of layer_types")
        layer = copy.copy(self)
        if self.layer_types[index] == SLIDING:
            layer.num_attention_heads = self.sliding_num_attention_heads
            layer.num_query_groups = self.sliding_num_query_groups
            layer.kv_channels = self.sliding_kv_channels
            # Megatron's window (left, right) includes the query itself on neither side.
            layer.window_size = (self.sliding_window - 1, 0)
        else:
            layer.window_size = None
        layer.rotary_base = self.rotary_bases[index]
        layer.rotary_percent = self.rotary_percents[index]
        layer.swiglu_limit = self.swiglu_limits[index] or None
        layer.swiglu_limit_shared = self.swiglu_limits_shared[index] or None
        return layer

    def parallel_splits(self) -> dict[str, dict[str, int]]:
        if SLIDING not in self.layer_types:
            return {}
        return {
            "tp": {
                "sliding_num_attention_heads": self.sliding_num_attention_heads,
                "sliding_num_query_groups": self.sliding_num_query_groups,
            }
        }

    def rope_scaled(self, index: int) -> bool:
        return self.llama3_rope is not None and self.layer_types[index] in self.llama3_layer_types


def _layer_list(
    cfg: dict[str, Any], key: str, default: Any, types: list[str], layers: int, by_type: bool = True
) -> list[Any]:
    """A per-layer value over decoder + MTP layers from a scalar or a list.

    A list that covers only the decoder layers gives each MTP layer, with `by_type`, the value of the
    first decoder layer of its attention type (transformers keeps one rope setting per type), else
    `default`.
    """
    value = cfg.get(key, default)
    if value is None:
        value = default
    total = len(types)
    if not isinstance(value, list):
        return [value] * total
    if len(value) == total:
        return list(value)
    if len(value) == layers:
        first = {t: value[types.index(t)] for t in set(types[:layers])} if by_type else {}
        return list(value) + [first.get(t, default) for t in types[layers:]]
    expected = f"{layers} (one per layer) or {total} (layers and MTP layers)" if total != layers else f"{layers}"
    raise BridgeError(f"config.json {key} has {len(value)} entries, expected {expected}")


def _need(cfg: dict[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise BridgeError(f"config.json lacks {key}")
    return cfg[key]


def _layer_types(cfg: dict[str, Any], layers: int, mtp: int) -> list[str]:
    given = cfg.get("layer_types") or [FULL] * layers
    types = list(given) + list(cfg.get("mtp_layer_types") or [FULL] * mtp) if len(given) == layers else given
    if len(types) != layers + mtp:
        raise BridgeError(
            f"config.json layer_types (+ mtp_layer_types) has {len(types)} entries, expected"
            f" num_hidden_layers ({layers}) or num_hidden_layers + num_nextn_predict_layers ({layers + mtp})"
        )
    unknown = sorted(set(types) - {FULL, SLIDING})
    if unknown:
        raise BridgeError(f"config.json layer_types has {unknown}, expected only {FULL!r} and {SLIDING!r}")
    return list(types)


def _same(cfg: dict[str, Any], *keys: str) -> Any:
    """The value of the first of `keys` present (None if none is); two present must agree."""
    present = [k for k in keys if cfg.get(k) is not None]
    for key in present[1:]:
        if cfg[key] != cfg[present[0]]:
            raise BridgeError(f"config.json {present[0]} ({cfg[present[0]]!r}) and {key} ({cfg[key]!r}) disagree")
    return cfg[present[0]] if present else None


def _mlp_layer_types(cfg: dict[str, Any], layers: int) -> list[int] | None:
    """The MoE decoder layers from transformers' `mlp_layer_types` ("sparse"/"dense"), or None."""
    kinds = cfg.get("mlp_layer_types")
    if kinds is None:
        return None
    if len(kinds) != layers or set(kinds) - {"sparse", "dense"}:
        raise BridgeError(f"config.json mlp_layer_types is {kinds!r}; expected {layers} entries of 'sparse' or 'dense'")
    mtp_kinds = cfg.get("mtp_mlp_layer_types") or []
    if set(mtp_kinds) - {"dense"}:
        raise BridgeError(f"config.json mtp_mlp_layer_types is {mtp_kinds!r}; MTP layers are dense ('dense')")
    return [i for i, kind in enumerate(kinds) if kind == "sparse"]


def _moe_layers(cfg: dict[str, Any], layers: int) -> list[int]:
    """The MoE decoder layers: `mlp_layer_types` (transformers), `moe_layers_enum` ("3,4,..." or a
    list), else transformers' default 3.. ; the two keys, when both given, must agree."""
    sparse = _mlp_layer_types(cfg, layers)
    enum = cfg.get("moe_layers_enum")
    if enum is not None and sparse is not None and _enum_layers(enum, layers) != sparse:
        raise BridgeError(f"config.json moe_layers_enum ({enum!r}) and mlp_layer_types name different MoE layers")
    if sparse is not None:
        return sparse
    if enum is None:
        if cfg.get("use_moe") is False:
            return []
        return list(range(3, layers))
    return _enum_layers(enum, layers)


def _enum_layers(enum: Any, layers: int) -> list[int]:
    items = enum.split(",") if isinstance(enum, str) else enum
    try:
        indices = sorted({int(str(i).strip()) for i in items if str(i).strip()})
    except ValueError:
        raise BridgeError(f"config.json moe_layers_enum {enum!r} is not a list of layer indices") from None
    outside = [i for i in indices if not 0 <= i < layers]
    if outside:
        raise BridgeError(
            f"config.json moe_layers_enum names layers {outside}, expected decoder layers 0..{layers - 1}"
            " (MTP layers are dense)"
        )
    return indices


def _llama3(scaling: dict[str, Any] | None, key: str = "rope_scaling") -> dict[str, float] | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise BridgeError(f"config.json {key}.rope_type is {kind!r}, expected 'llama3'")
    missing = [k for k in _LLAMA3_KEYS if k not in scaling]
    if missing:
        raise BridgeError(f"config.json {key} lacks {missing} for llama3 scaling")
    return {k: float(scaling[k]) for k in _LLAMA3_KEYS}


@dataclass(frozen=True)
class _Rope:
    """Per-layer rope over decoder + MTP layers, and the llama3 scaling with the types it applies to."""

    bases: list[float]
    percents: list[float]
    llama3: dict[str, float] | None
    llama3_types: list[str]


def _legacy_rope(cfg: dict[str, Any], types: list[str], layers: int) -> _Rope:
    """The released spelling: per-layer `rope_theta` / `partial_rotary_factors`, llama3 `rope_scaling`
    on the layer types of `yarn_only_types`."""

    def floats(key: str, default: float) -> list[float]:
        return [float(v or 0) for v in _layer_list(cfg, key, default, types, layers)]

    return _Rope(
        bases=floats("rope_theta", 10000.0),
        percents=floats("partial_rotary_factors", cfg.get("partial_rotary_factor", 1.0)),
        llama3=_llama3(cfg.get("rope_scaling")),
        llama3_types=list(cfg.get("yarn_only_types") or [FULL]),
    )


_ROPE_DEFAULT_KEYS = {"rope_type", "rope_theta", "partial_rotary_factor"}


def _typed_rope(rope: Any, types: list[str]) -> _Rope:
    """transformers' spelling: `rope_parameters` with one object per layer type, each a default or a
    llama3 rope (theta, partial_rotary_factor, and llama3's factors)."""
    if not isinstance(rope, dict) or not all(isinstance(rope.get(t), dict) for t in set(types)):
        raise BridgeError(
            f"config.json rope_parameters must hold one object per layer type ({sorted(set(types))}), got {rope!r}"
        )
    llama3: dict[str, float] | None = None
    llama3_types: list[str] = []
    for kind in sorted(set(types)):
        params, key = rope[kind], f"rope_parameters.{kind}"
        rope_type = params.get("rope_type", params.get("type", "default"))
        allowed = _ROPE_DEFAULT_KEYS | {"type"} | (set(_LLAMA3_KEYS) if rope_type == "llama3" else set())
        if rope_type not in ("default", "llama3"):
            raise BridgeError(f"config.json {key}.rope_type is {rope_type!r}; only 'default' and 'llama3' are known")
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise BridgeError(f"config.json {key} has {unknown}, which a {rope_type} rope does not use")
        if "rope_theta" not in params:
            raise BridgeError(f"config.json {key} lacks rope_theta")
        if rope_type == "llama3":
            scaling = _llama3(params, key)
            if llama3 is not None and scaling != llama3:
                raise BridgeError(f"config.json {key}: llama3 scaling differs between layer types")
            llama3 = scaling
            llama3_types.append(kind)
    return _Rope(
        bases=[float(rope[t]["rope_theta"]) for t in types],
        percents=[float(rope[t].get("partial_rotary_factor", 1.0)) for t in types],
        llama3=llama3,
        llama3_types=llama3_types or [FULL],
    )


def _rope(cfg: dict[str, Any], types: list[str], layers: int) -> _Rope:
    """Either spelling; with both (transformers keeps `yarn_only_types` beside `rope_parameters`), each
    released key present must describe the rope `rope_parameters` describes."""
    if cfg.get("rope_parameters") is None:
        return _legacy_rope(cfg, types, layers)
    typed, legacy = _typed_rope(cfg["rope_parameters"], types), _legacy_rope(cfg, types, layers)

    def scaled(rope: _Rope) -> list[bool]:
        return [rope.llama3 is not None and t in rope.llama3_types for t in types]

    agrees = {
        "rope_theta": legacy.bases == typed.bases,
        "partial_rotary_factors": legacy.percents == typed.percents,
        "partial_rotary_factor": legacy.percents == typed.percents,
        "rope_scaling": legacy.llama3 == typed.llama3 and scaled(legacy) == scaled(typed),
        "yarn_only_types": typed.llama3 is None
        or [t in (cfg.get("yarn_only_types") or ()) for t in types] == scaled(typed),
    }
    for key, same in agrees.items():
        if cfg.get(key) is not None and not same:
            raise BridgeError(f"config.json {key} and rope_parameters describe different ropes")
    return typed


def _unsupported(cfg: dict[str, Any]) -> None:
    if cfg.get("att_impl_type", "GQA") != "GQA":
        raise BridgeError(f"config.json att_impl_type is {cfg['att_impl_type']!r}, expected 'GQA'")
    if cfg.get("sink"):
        raise BridgeError("config.json sink is true: attention sinks are not supported")
    if cfg.get("use_rope_layers"):
        raise BridgeError("config.json use_rope_layers is set: only rope on every layer is supported")
    if cfg.get("norm_expert_weight", True) is False:
        raise BridgeError("config.json norm_expert_weight is false: Megatron always renormalises top-k weights")
    # Keys transformers' Step3p7TextConfig writes (or accepts) that change the numerics.
    for key in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
        if cfg.get(key):
            raise BridgeError(f"config.json {key} is {cfg[key]!r}; only false is supported")
    if cfg.get("gating", True) not in (True, "per-head"):
        raise BridgeError(f"config.json gating is {cfg['gating']!r}; only the head-wise gate (true) is supported")
    head_dim = cfg.get("head_dim") or cfg.get("hidden_size", 0) // max(1, cfg.get("num_attention_heads") or 1)
    scalar = cfg.get("query_pre_attn_scalar")
    if scalar is not None and float(scalar) != float(head_dim):
        raise BridgeError(
            f"config.json query_pre_attn_scalar is {scalar!r}; only head_dim ({head_dim}) is supported"
            " (softmax scale head_dim**-0.5)"
        )


def _check_per_layer(cfg: dict[str, Any], types: list[str], full_heads: int, sliding_heads: int) -> None:
    """transformers' `per_layer_config` ({layer: {num_attention_heads: n}}) must say what the types say."""
    per_layer = cfg.get("per_layer_config") or {}
    if not isinstance(per_layer, dict):
        raise BridgeError(f"config.json per_layer_config is {per_layer!r}; expected an object keyed by layer")
    for layer, override in per_layer.items():
        key = f"per_layer_config.{layer}"
        if not str(layer).isdigit() or int(layer) >= len(types) or not isinstance(override, dict):
            raise BridgeError(f"config.json {key}: expected a layer index below {len(types)} and an object")
        unknown = sorted(set(override) - {"num_attention_heads"})
        if unknown:
            raise BridgeError(f"config.json {key} overrides {unknown}; only num_attention_heads is supported")
        expected = sliding_heads if types[int(layer)] == SLIDING else full_heads
        if "num_attention_heads" in override and int(override["num_attention_heads"]) != expected:
            raise BridgeError(
                f"config.json {key}.num_attention_heads is {override['num_attention_heads']}; layer {layer}"
                f" ({types[int(layer)]}) has {expected} heads by num_attention_heads / num_sliding_attention_heads"
            )


def _dtype(cfg: dict[str, Any]) -> torch.dtype:
    name = cfg.get("torch_dtype", cfg.get("dtype", "bfloat16"))
    if str(name).removeprefix("torch.") not in _DTYPES:
        raise BridgeError(f"config.json torch_dtype is {name!r}, expected one of {sorted(_DTYPES)}")
    return _DTYPES[str(name).removeprefix("torch.")]


def step35_model_config(text_config: dict[str, Any], **overrides: Any) -> Step35Config:
    """Translate a Step-3.5 config.json (or a Step-3.7 `text_config`) into a `Step35Config`.

    Defaults for absent keys: `zero_centered` true, `use_qk_norm` true, `use_head_wise_attn_gate`
    true, `tie_word_embeddings` false, `num_nextn_predict_layers` 0, `layer_types` all full (MTP
    types from `mtp_layer_types` when `layer_types` covers only the decoder), `rope_theta` 10000,
    `partial_rotary_factors` 1.0, `moe_layers_enum` layers 3.. (transformers' default),
    `moe_router_activation` sigmoid, `use_moe_router_bias` true, `moe_router_scaling_factor` 1.0,
    `need_fp32_gate` true, swiglu limits 0 (no clamp), `torch_dtype` bfloat16. `overrides` set any
    `Step35Config` field afterwards.
    """
    cfg = text_config
    _unsupported(cfg)
    hidden, layers = int(_need(cfg, "hidden_size")), int(_need(cfg, "num_hidden_layers"))
    heads, vocab = int(_need(cfg, "num_attention_heads")), int(_need(cfg, "vocab_size"))
    ffn = int(_need(cfg, "intermediate_size"))
    mtp = int(_same(cfg, "num_nextn_predict_layers", "num_mtp_layers") or 0)
    groups = int(_same(cfg, "num_attention_groups", "num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    types = _layer_types(cfg, layers, mtp)
    other = cfg.get("attention_other_setting") or {}
    released, transformers = other.get("num_attention_heads"), cfg.get("num_sliding_attention_heads")
    if released is not None and transformers is not None and int(released) != int(transformers):
        raise BridgeError(
            f"config.json attention_other_setting.num_attention_heads ({released}) and"
            f" num_sliding_attention_heads ({transformers}) disagree"
        )
    sliding_heads = int(transformers or released or heads)
    _check_per_layer(cfg, types, heads, sliding_heads)
    if SLIDING in types and not cfg.get("sliding_window"):
        raise BridgeError("config.json has sliding_attention layers but no sliding_window")

    moe_layers = _moe_layers(cfg, layers)
    moe: dict[str, Any] = {}
    if moe_layers:
        activation = cfg.get("moe_router_activation", "sigmoid")
        if activation not in ("sigmoid", "softmax"):
            raise BridgeError(f"config.json moe_router_activation is {activation!r}, expected 'sigmoid' or 'softmax'")
        shared = _same(cfg, "share_expert_dim", "share_expert_dims")
        experts = _same(cfg, "moe_num_experts", "n_routed_experts")
        topk = _same(cfg, "moe_top_k", "num_experts_per_tok")
        if experts is None or topk is None:
            raise BridgeError(
                f"config.json lacks {'moe_num_experts (or n_routed_experts)' if experts is None else ''}"
                f"{' and ' if experts is None and topk is None else ''}"
                f"{'moe_top_k (or num_experts_per_tok)' if topk is None else ''}"
            )
        moe = dict(
            num_moe_experts=int(experts),
            moe_router_topk=int(topk),
            moe_ffn_hidden_size=int(_need(cfg, "moe_intermediate_size")),
            moe_shared_expert_intermediate_size=int(shared) if shared else None,
            moe_layer_freq=[int(i in moe_layers) for i in range(layers)],
            moe_router_score_function=activation,
            moe_router_enable_expert_bias=bool(cfg.get("use_moe_router_bias", True)),
            moe_router_topk_scaling_factor=float(cfg.get("moe_router_scaling_factor", 1.0)),
            moe_router_dtype="fp32" if cfg.get("need_fp32_gate", True) else None,
            moe_router_pre_softmax=False,
        )

    dtype = _dtype(cfg)

    def floats(key: str, default: float, by_type: bool = True) -> list[float]:
        return [float(v or 0) for v in _layer_list(cfg, key, default, types, layers, by_type)]

    rope = _rope(cfg, types, layers)
    fields: dict[str, Any] = dict(
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-5)),
        normalization="RMSNorm",
        layernorm_zero_centered_gamma=bool(cfg.get("zero_centered", True)),
        qk_layernorm=bool(cfg.get("use_qk_norm", True)),
        attention_output_gate=bool(cfg.get("use_head_wise_attn_gate", True)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        mtp_num_layers=mtp or None,
        vocab_size=vocab,
        max_sequence_length=int(cfg.get("max_position_embeddings", cfg.get("max_seq_len", 4096))),
        position_embedding_type="rope",
        rotary_base=rope.bases[0],
        rotary_percent=rope.percents[0],
        share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
        hf_config=cfg,
        layer_types=types,
        rotary_bases=rope.bases,
        rotary_percents=rope.percents,
        llama3_rope=rope.llama3,
        llama3_layer_types=rope.llama3_types,
        sliding_window=int(cfg["sliding_window"]) if cfg.get("sliding_window") else None,
        sliding_num_attention_heads=sliding_heads,
        sliding_num_query_groups=int(other.get("num_attention_groups", groups)),
        sliding_kv_channels=int(other.get("head_dim", head_dim)),
        swiglu_limits=floats("swiglu_limits", 0.0, by_type=False),
        swiglu_limits_shared=floats("swiglu_limits_shared", 0.0, by_type=False),
        **moe,
    )
    fields.update(overrides)
    return Step35Config(**fields)
