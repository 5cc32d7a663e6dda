"""Every Step-3.5 HF tensor <-> Megatron param relation.

Megatron names follow megatron-core's local specs (`spec.py`); HF names the released on-disk layout
(`model.layers.{i}.moe.{gate,up,down}_proj.weight` stacked `[E, ...]`, `share_expert`, `g_proj`,
MTP layer j at `model.layers.{num_layers + j}`). Attention shapes differ between full and sliding
layers, so the attention mappings are made per type (`layers=`) and, for MTP layers, per layer.
"""

from __future__ import annotations

from collections.abc import Collection

from bridgecore.plugin import ColumnParallel, FusedQKV, GatedMLP, Mapping, Replicated, RowParallel, Stacked
from bridgecore_step35.provider import Step35Config

#: HF prefixes of the language model: the released layout, and re-saved multimodal (Step-3.7) ones.
HF_PREFIXES = ("model.", "model.language_model.")


def detect_hf_prefix(hf_keys: Collection[str]) -> str:
    """`model.language_model.` when the checkpoint's embeddings live there, else `model.`."""
    wrapped = f"{HF_PREFIXES[1]}embed_tokens.weight"
    return HF_PREFIXES[1] if wrapped in hf_keys else HF_PREFIXES[0]


def _attention(config: Step35Config, index: int, meg: str, hf: str, layers: list[int] | None) -> list[Mapping]:
    """Attention of the layers shaped like layer `index` (`layers=`), or of one literal layer."""
    layer = config.layer_config(index)
    gate = dict(gate="headwise", g=f"{hf}self_attn.g_proj.weight") if config.attention_output_gate else {}
    mappings: list[Mapping] = [
        FusedQKV(
            f"{meg}self_attention.linear_qkv.weight",
            f"{hf}self_attn.q_proj.weight",
            f"{hf}self_attn.k_proj.weight",
            f"{hf}self_attn.v_proj.weight",
            heads=layer.num_attention_heads,
            groups=layer.num_query_groups,
            head_dim=layer.kv_channels,
            layers=layers,
            **gate,
        ),
        RowParallel(f"{meg}self_attention.linear_proj.weight", f"{hf}self_attn.o_proj.weight", layers=layers),
    ]
    if config.qk_layernorm:
        mappings += [
            Replicated(f"{meg}self_attention.q_layernorm.weight", f"{hf}self_attn.q_norm.weight", layers=layers),
            Replicated(f"{meg}self_attention.k_layernorm.weight", f"{hf}self_attn.k_norm.weight", layers=layers),
        ]
    return mappings


def _norms_and_dense_mlp(meg: str, hf: str, layers: list[int] | None) -> list[Mapping]:
    return [
        Replicated(f"{meg}input_layernorm.weight", f"{hf}input_layernorm.weight", layers=layers),
        Replicated(f"{meg}pre_mlp_layernorm.weight", f"{hf}post_attention_layernorm.weight", layers=layers),
        GatedMLP(f"{meg}mlp.linear_fc1.weight", f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight", layers=layers),
        RowParallel(f"{meg}mlp.linear_fc2.weight", f"{hf}mlp.down_proj.weight", layers=layers),
    ]


def _moe(config: Step35Config, meg: str, hf: str, layers: list[int]) -> list[Mapping]:
    experts, moe = config.num_moe_experts, f"{hf}moe."
    expert = f"{meg}mlp.experts.local_experts.{{expert}}."
    mappings: list[Mapping] = [
        Replicated(f"{meg}input_layernorm.weight", f"{hf}input_layernorm.weight", layers=layers),
        Replicated(f"{meg}pre_mlp_layernorm.weight", f"{hf}post_attention_layernorm.weight", layers=layers),
        Replicated(f"{meg}mlp.router.weight", f"{hf}moe.gate.weight", layers=layers),
        Stacked(
            GatedMLP(f"{expert}linear_fc1.weight", f"{moe}gate_proj.weight", f"{moe}up_proj.weight", layers=layers),
            experts,
        ),
        Stacked(RowParallel(f"{expert}linear_fc2.weight", f"{moe}down_proj.weight", layers=layers), experts),
    ]
    if config.moe_router_enable_expert_bias:
        # An fp32 persistent buffer on both sides.
        mappings.append(Replicated(f"{meg}mlp.router.expert_bias", f"{hf}moe.router_bias", layers=layers))
    if config.moe_shared_expert_intermediate_size:
        shared, hf_shared = f"{meg}mlp.shared_experts.", f"{hf}share_expert."
        gate, up = f"{hf_shared}gate_proj.weight", f"{hf_shared}up_proj.weight"
        mappings += [
            GatedMLP(f"{shared}linear_fc1.weight", gate, up, layers=layers),
            RowParallel(f"{shared}linear_fc2.weight", f"{hf_shared}down_proj.weight", layers=layers),
        ]
    return mappings


def _mtp(config: Step35Config, meg_prefix: str, hf_prefix: str) -> list[Mapping]:
    n = config.num_layers
    meg, hf = f"{meg_prefix}mtp.layers.{{mtp}}.", f"{hf_prefix}layers.{{mtp+{n}}}."
    mappings: list[Mapping] = [
        Replicated(f"{meg}enorm.weight", f"{hf}enorm.weight"),
        Replicated(f"{meg}hnorm.weight", f"{hf}hnorm.weight"),
        # Megatron concatenates [embedding, hidden] like HF's eh_proj input.
        ColumnParallel(f"{meg}eh_proj.weight", f"{hf}eh_proj.weight"),
        Replicated(f"{meg}final_layernorm.weight", f"{hf}transformer.shared_head.norm.weight"),
        ColumnParallel(f"{meg}output_layer.weight", f"{hf}transformer.shared_head.output.weight"),
    ]
    mappings += _norms_and_dense_mlp(f"{meg}transformer_layer.", hf, None)
    for j in range(config.mtp_num_layers or 0):
        # Each MTP layer's attention shape follows its own type, so these are literal per layer.
        meg_j, hf_j = f"{meg_prefix}mtp.layers.{j}.transformer_layer.", f"{hf_prefix}layers.{n + j}."
        mappings += _attention(config, n + j, meg_j, hf_j, None)
    return mappings


def step35_mappings(
    config: Step35Config,
    hf_keys: Collection[str],
    hf_prefix: str | None = None,
    megatron_prefix: str = "",
    lm_head: str = "lm_head.weight",
) -> list[Mapping]:
    """All mappings of a Step-3.5 language model.

    `hf_prefix` is where the HF decoder lives (`model.`); None detects `model.` or
    `model.language_model.` from `hf_keys`. `megatron_prefix` prefixes every Megatron name (a
    multimodal wrapper passes `language_model.`). `lm_head` is the HF output head's name.
    """
    hf = detect_hf_prefix(hf_keys) if hf_prefix is None else hf_prefix
    meg = megatron_prefix
    mappings: list[Mapping] = [
        ColumnParallel(f"{meg}embedding.word_embeddings.weight", f"{hf}embed_tokens.weight"),
        Replicated(f"{meg}decoder.final_layernorm.weight", f"{hf}norm.weight"),
    ]
    if not config.share_embeddings_and_output_weights:
        mappings.append(ColumnParallel(f"{meg}output_layer.weight", lm_head))

    layer_meg, layer_hf = f"{meg}decoder.layers.{{layer}}.", f"{hf}layers.{{layer}}."
    decoder_types = config.layer_types[: config.num_layers]
    for kind in sorted(set(decoder_types)):
        same = [i for i, t in enumerate(decoder_types) if t == kind]
        mappings += _attention(config, same[0], layer_meg, layer_hf, same)
    freq = config.moe_layer_freq if config.num_moe_experts else [0] * config.num_layers
    dense = [i for i in range(config.num_layers) if not freq[i]]
    moe = [i for i in range(config.num_layers) if freq[i]]
    if dense:
        mappings += _norms_and_dense_mlp(layer_meg, layer_hf, dense)
    if moe:
        mappings += _moe(config, layer_meg, layer_hf, moe)
    if config.mtp_num_layers:
        mappings += _mtp(config, meg, hf)
    return mappings
