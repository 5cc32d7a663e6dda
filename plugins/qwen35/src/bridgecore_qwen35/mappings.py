"""Every Qwen3.5 / Qwen3.6 HF tensor <-> Megatron param (TE-style names, see spec.py).

Layout facts, checked against transformers 5.23 (`qwen3_5`, `qwen3_5_moe`) and megatron-core 0.16.1:
- `q_proj` holds q and the output gate per head, [q_h (d rows); gate_h (d rows)]: transformers views
  its output as [..., heads, 2d] and chunks the last dim in two (`FusedQKV(gate="in_q")`).
- GDN `in_proj`: GatedDeltaNet splits each rank's output as [q, k, v, z, b, a], each the rank's
  contiguous share of its heads (q/k by key head, v/z/b/a by value head), and its conv1d as [q, k, v].
  So `in_proj` depends on TP size: one `Concat` component per block, each split over TP on its own.
- The GDN output norm is plain in HF and zero-centered in Megatron (-1 on import), the only such norm.
- Packed experts: `gate_up_proj` [E, 2I, H] with gate rows first (`linear(x, w[e]).chunk(2)`: gate,
  up) and `down_proj` [E, H, I], i.e. the usual [out, in] per expert. Stored packed or per expert;
  the checkpoint's keys say which, separately for the decoder and the MTP layer (Qwen3.6 packs both).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bridgecore.plugin import (
    BridgeError,
    ColumnParallel,
    Concat,
    FusedQKV,
    GatedMLP,
    Mapping,
    PackedGatedMLP,
    Replicated,
    RowParallel,
    Shifted,
    Stacked,
)
from bridgecore_qwen35.architectures import VL_ARCHITECTURES

#: the vision tower of the VL checkpoints; not converted (see README), waived with --allow-unmapped.
VISION_TENSORS = "model.visual.*"


def hf_prefix(config: Any) -> str:
    arches = config.hf_config.get("architectures") or []
    return "model.language_model." if arches and arches[0] in VL_ARCHITECTURES else "model."


def experts_packed(hf_keys: Iterable[str], prefix: str) -> bool:
    """Whether the experts under `prefix` (`model.layers.`, `mtp.layers.`) are stored packed.

    With no keys (export without a source checkpoint) the packed form is written: it is what
    transformers 5 loads natively and how Qwen3.6 ships.
    """
    keys = [k for k in hf_keys if k.startswith(prefix) and ".mlp.experts." in k]
    packed = any(k.endswith(".mlp.experts.gate_up_proj") for k in keys)
    per_expert = any(k.endswith(".gate_proj.weight") for k in keys)
    if packed and per_expert:
        raise BridgeError(
            f"checkpoint stores the experts under {prefix}* both packed (experts.gate_up_proj)"
            " and per expert (experts.N.gate_proj.weight); expected one form"
        )
    return packed or not keys


def _attention(meg: str, hf: str, config: Any, layers: list[int] | None) -> list[Mapping]:
    a = f"{meg}.self_attention."
    h = f"{hf}.self_attn."
    return [
        Replicated(f"{a}linear_qkv.layer_norm_weight", f"{hf}.input_layernorm.weight", layers=layers),
        FusedQKV(
            f"{a}linear_qkv.weight",
            f"{h}q_proj.weight",
            f"{h}k_proj.weight",
            f"{h}v_proj.weight",
            heads=config.num_attention_heads,
            groups=config.num_query_groups,
            head_dim=config.kv_channels,
            gate="in_q",
            layers=layers,
        ),
        Replicated(f"{a}q_layernorm.weight", f"{h}q_norm.weight", layers=layers),
        Replicated(f"{a}k_layernorm.weight", f"{h}k_norm.weight", layers=layers),
        RowParallel(f"{a}linear_proj.weight", f"{h}o_proj.weight", layers=layers),
    ]


def _gdn(meg: str, hf: str, config: Any, layers: list[int]) -> list[Mapping]:
    a = f"{meg}.self_attention."
    h = f"{hf}.linear_attn."
    key = config.linear_num_key_heads * config.linear_key_head_dim
    value = config.linear_num_value_heads * config.linear_value_head_dim
    heads = config.linear_num_value_heads
    return [
        Replicated(f"{a}in_proj.layer_norm_weight", f"{hf}.input_layernorm.weight", layers=layers),
        Concat(
            f"{a}in_proj.weight",
            [f"{h}in_proj_qkv.weight", f"{h}in_proj_z.weight", f"{h}in_proj_b.weight", f"{h}in_proj_a.weight"],
            components=[(0, 0, key), (0, key, key), (0, 2 * key, value), (1, 0, value), (2, 0, heads), (3, 0, heads)],
            layers=layers,
        ),
        Concat(
            f"{a}conv1d.weight",
            [f"{h}conv1d.weight"],
            components=[(0, 0, key), (0, key, key), (0, 2 * key, value)],
            layers=layers,
        ),
        ColumnParallel(f"{a}A_log", f"{h}A_log", layers=layers),
        ColumnParallel(f"{a}dt_bias", f"{h}dt_bias", layers=layers),
        Shifted(Replicated(f"{a}out_norm.weight", f"{h}norm.weight", layers=layers), -1.0),
        RowParallel(f"{a}out_proj.weight", f"{h}out_proj.weight", layers=layers),
    ]


def _dense_mlp(meg: str, hf: str) -> list[Mapping]:
    return [
        Replicated(f"{meg}.mlp.linear_fc1.layer_norm_weight", f"{hf}.post_attention_layernorm.weight"),
        GatedMLP(f"{meg}.mlp.linear_fc1.weight", f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"),
        RowParallel(f"{meg}.mlp.linear_fc2.weight", f"{hf}.mlp.down_proj.weight"),
    ]


def _moe(meg: str, hf: str, config: Any, packed: bool) -> list[Mapping]:
    m, h = f"{meg}.mlp.", f"{hf}.mlp."
    fc1, fc2 = (
        f"{m}experts.local_experts.{{expert}}.linear_fc1.weight",
        f"{m}experts.local_experts.{{expert}}.linear_fc2.weight",
    )
    if packed:
        experts = [
            Stacked(PackedGatedMLP(fc1, f"{h}experts.gate_up_proj"), config.num_moe_experts),
            Stacked(RowParallel(fc2, f"{h}experts.down_proj"), config.num_moe_experts),
        ]
    else:
        e = f"{h}experts.{{expert}}."
        experts = [
            GatedMLP(fc1, f"{e}gate_proj.weight", f"{e}up_proj.weight"),
            RowParallel(fc2, f"{e}down_proj.weight"),
        ]
    s = f"{h}shared_expert."
    return [
        Replicated(f"{meg}.pre_mlp_layernorm.weight", f"{hf}.post_attention_layernorm.weight"),
        Replicated(f"{m}router.weight", f"{h}gate.weight"),
        *experts,
        GatedMLP(f"{m}shared_experts.linear_fc1.weight", f"{s}gate_proj.weight", f"{s}up_proj.weight"),
        RowParallel(f"{m}shared_experts.linear_fc2.weight", f"{s}down_proj.weight"),
        Replicated(f"{m}shared_experts.gate_weight", f"{h}shared_expert_gate.weight"),
    ]


def _mlp(meg: str, hf: str, config: Any, packed: bool) -> list[Mapping]:
    return _moe(meg, hf, config, packed) if config.num_moe_experts else _dense_mlp(meg, hf)


def qwen35_mappings(config: Any, hf_keys: Iterable[str]) -> list[Mapping]:
    keys = list(hf_keys)
    p = hf_prefix(config)
    pattern = config.linear_attention_freq
    linear = [i for i, is_linear in enumerate(pattern) if is_linear]
    full = [i for i, is_linear in enumerate(pattern) if not is_linear]
    meg, hf = "decoder.layers.{layer}", f"{p}layers.{{layer}}"
    out: list[Mapping] = [
        ColumnParallel("embedding.word_embeddings.weight", f"{p}embed_tokens.weight"),
        Replicated("decoder.final_layernorm.weight", f"{p}norm.weight"),
        *_gdn(meg, hf, config, linear),
        *_attention(meg, hf, config, full),
        *_mlp(meg, hf, config, experts_packed(keys, f"{p}layers.")),
    ]
    if not config.share_embeddings_and_output_weights:
        out.append(ColumnParallel("output_layer.weight", "lm_head.weight"))
    if config.mtp_num_layers:
        mtp = "mtp.layers.{mtp}"
        out += [
            ColumnParallel(f"{mtp}.eh_proj.weight", "mtp.fc.weight"),
            Replicated(f"{mtp}.enorm.weight", "mtp.pre_fc_norm_embedding.weight"),
            Replicated(f"{mtp}.hnorm.weight", "mtp.pre_fc_norm_hidden.weight"),
            Replicated(f"{mtp}.final_layernorm.weight", "mtp.norm.weight"),
            *_attention(f"{mtp}.transformer_layer", "mtp.layers.{mtp}", config, None),
            *_mlp(f"{mtp}.transformer_layer", "mtp.layers.{mtp}", config, experts_packed(keys, "mtp.layers.")),
        ]
    return out
