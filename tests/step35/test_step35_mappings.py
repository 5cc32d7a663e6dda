"""Mapping coverage of the built model, prefixes, and the head-wise gate layout over TP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from step35_testing import RELEASED, read_tensors

from bridgecore import AutoBridge
from bridgecore.errors import BridgeError
from bridgecore.mapping import FusedQKV, MappingTable, Shard, TensorSource
from bridgecore.megatron.params import local_tensors
from bridgecore_step35 import step35_mappings, step35_model_config
from bridgecore_step35.tiny import TINY_CONFIG, step35_tensor_shapes

CONFIG = step35_model_config(TINY_CONFIG)
HF_KEYS = frozenset(step35_tensor_shapes(TINY_CONFIG))


def test_built_model_is_covered(tiny_dir: Path) -> None:
    """Every param and persistent buffer of the TP=1 model binds, every checkpoint tensor is used."""
    bridge = AutoBridge.from_hf_pretrained(tiny_dir)
    model = bridge.to_megatron_model(load_weights=False)
    bound = bridge.bind(model, bridge.hf_keys)
    names = {t.name for t, _ in bound}
    assert "decoder.layers.2.mlp.router.expert_bias" in names  # an fp32 persistent buffer
    assert {"mtp.layers.0.output_layer.weight", "mtp.layers.1.output_layer.weight"} <= names
    assert len(names) == len(local_tensors(model, bridge.config))


def test_released_model_exports_the_released_layout() -> None:
    """The full-size Step-3.5-Flash model, built on the meta device, binds and plans exactly §1.2's 804 tensors."""
    bridge = AutoBridge.from_hf_config(RELEASED)
    model = bridge.to_megatron_model(meta=True)
    expected = step35_tensor_shapes(RELEASED)
    plan = bridge.export_entries(bridge.bind(model, frozenset(expected)))
    assert {name: (tuple(shape), dtype) for name, shape, dtype in plan} == expected


def test_attention_shapes_per_layer_type() -> None:
    table = MappingTable(step35_mappings(CONFIG, HF_KEYS))
    heads = {
        name: table.find(name).mapping.heads
        for name in [f"decoder.layers.{i}.self_attention.linear_qkv.weight" for i in range(4)]
        + [f"mtp.layers.{j}.transformer_layer.self_attention.linear_qkv.weight" for j in range(2)]
    }
    assert list(heads.values()) == [4, 6, 6, 6, 4, 6]
    mtp_head = table.find("mtp.layers.1.output_layer.weight")
    assert mtp_head.hf == ["model.layers.5.transformer.shared_head.output.weight"]


@pytest.mark.parametrize("hf_prefix", ["model.", "model.language_model."])
def test_prefixes(hf_prefix: str) -> None:
    keys = frozenset(k.replace("model.", hf_prefix, 1) for k in HF_KEYS)
    mappings = step35_mappings(CONFIG, keys, megatron_prefix="language_model.")
    assert all(m.megatron.text.startswith("language_model.") for m in mappings)
    table = MappingTable(mappings)
    binding = table.find("language_model.mtp.layers.0.enorm.weight")
    assert binding.hf == [f"{hf_prefix}layers.4.enorm.weight"]
    assert table.find("language_model.output_layer.weight").hf == ["lm_head.weight"]


def _qkv(layer: int) -> tuple[FusedQKV, dict[str, int], TensorSource, dict[str, torch.Tensor]]:
    table = MappingTable(step35_mappings(CONFIG, HF_KEYS))
    binding = table.find(f"decoder.layers.{layer}.self_attention.linear_qkv.weight")
    shapes = step35_tensor_shapes(TINY_CONFIG)
    generator = torch.Generator().manual_seed(3)
    tensors = {n: torch.randn(shapes[n][0], generator=generator) for n in binding.hf}
    return binding.mapping, binding.capture_dict, TensorSource(tensors), tensors


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("tp", [1, 2])
def test_headwise_gate_follows_its_heads_over_tp(layer: int, tp: int) -> None:
    """Rank r holds groups r·G/tp.. and, in each, [q heads; their gate rows, each g row d times; k; v]."""
    mapping, captures, source, hf = _qkv(layer)
    q, k, v, g = (hf[n] for n in mapping.hf_names(captures))
    d, heads, groups = mapping.head_dim, mapping.heads, mapping.groups
    per_group = heads // groups
    shards = [mapping.to_megatron(source, captures, Shard(r, tp)) for r in range(tp)]
    for r, shard in enumerate(shards):
        blocks = shard.view(groups // tp, (2 * per_group + 2) * d, -1)
        for local, block in enumerate(blocks):
            group = r * groups // tp + local
            first = group * per_group
            assert torch.equal(block[: per_group * d], q[first * d : (first + per_group) * d])
            gate = g[first : first + per_group].repeat_interleave(d, dim=0)
            assert torch.equal(block[per_group * d : 2 * per_group * d], gate)
            assert torch.equal(block[2 * per_group * d : (2 * per_group + 1) * d], k[group * d : (group + 1) * d])
            assert torch.equal(block[(2 * per_group + 1) * d :], v[group * d : (group + 1) * d])
    back = {p.name: p.tensor for p in mapping.to_hf(shards, captures)}
    assert all(torch.equal(back[n], hf[n]) for n in hf)


def test_diverged_gate_rows_are_refused() -> None:
    """After training moved one row of a head's d gate rows, the HF [heads, H] gate cannot hold it."""
    mapping, captures, source, _ = _qkv(1)
    shard = mapping.to_megatron(source, captures, Shard(0, 1)).clone()
    per_group, d = mapping.heads // mapping.groups, mapping.head_dim
    shard[per_group * d + 1] += 1.0  # the second row of head 0's gate
    with pytest.raises(BridgeError, match="g_proj.weight"):
        mapping.to_hf([shard], captures)


def test_tiny_weights_load_as_stored(tiny_dir: Path) -> None:
    """Norms are copied as stored (zero-centered on both sides) and the router bias stays fp32."""
    bridge = AutoBridge.from_hf_pretrained(tiny_dir)
    model = bridge.to_megatron_model()
    params = {t.name: t.tensor for t in local_tensors(model, bridge.config)}
    hf = read_tensors(tiny_dir)
    assert torch.equal(params["decoder.final_layernorm.weight"], hf["model.norm.weight"])
    bias = params["decoder.layers.3.mlp.router.expert_bias"]
    assert bias.dtype == torch.float32 and torch.equal(bias, hf["model.layers.3.moe.router_bias"])
    head = params["mtp.layers.1.output_layer.weight"]
    assert torch.equal(head, hf["model.layers.5.transformer.shared_head.output.weight"])
    assert not torch.equal(head, params["output_layer.weight"])


def test_each_layer_kind_binds_only_its_own_modules() -> None:
    """Layers 0-1 are dense, 2-3 MoE: a dense MLP name on a MoE layer (or the reverse) is no param of
    the model, and must stay unmapped rather than bind to the other kind's tensors."""
    table = MappingTable(step35_mappings(CONFIG, HF_KEYS))
    dense = ["mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    moe = [
        "mlp.router.weight",
        "mlp.router.expert_bias",
        "mlp.experts.local_experts.0.linear_fc1.weight",
        "mlp.experts.local_experts.0.linear_fc2.weight",
        "mlp.shared_experts.linear_fc1.weight",
        "mlp.shared_experts.linear_fc2.weight",
    ]
    for name in dense:
        assert table.find(f"decoder.layers.1.{name}").hf[0].startswith("model.layers.1.mlp.")
        assert table.find(f"decoder.layers.2.{name}") is None, name
    for name in moe:
        assert table.find(f"decoder.layers.2.{name}") is not None, name
        assert table.find(f"decoder.layers.1.{name}") is None, name


def test_config_switches_drop_their_tensors() -> None:
    """Without the head-wise gate the attention has no g_proj; without MTP layers no mtp.* mapping."""
    layers = TINY_CONFIG["num_hidden_layers"]
    # per-layer lists hold the MTP layers' entries after the decoder's
    per_layer = {k: v[:layers] for k, v in TINY_CONFIG.items() if isinstance(v, list) and len(v) > layers}
    plain = {**TINY_CONFIG, **per_layer, "use_head_wise_attn_gate": False, "num_nextn_predict_layers": 0}
    plain = step35_model_config(plain)
    mappings = step35_mappings(plain, HF_KEYS)
    qkv = MappingTable(mappings).find("decoder.layers.0.self_attention.linear_qkv.weight").mapping
    assert isinstance(qkv, FusedQKV) and qkv.gate is None
    assert qkv.hf_names({"layer": 0})[-1] == "model.layers.0.self_attn.v_proj.weight"
    assert not [m for m in mappings if m.megatron.text.startswith("mtp.")]


def test_each_mtp_layer_has_the_attention_of_its_own_type() -> None:
    """Step-3.5-Flash's MTP layers 45-47 are full, sliding, sliding: each one's attention shape is
    its own type's, whatever the decoder layer next to it has."""
    config = step35_model_config(RELEASED)
    table = MappingTable(step35_mappings(config, frozenset()))

    def heads(name: str) -> int:
        return table.find(f"{name}.self_attention.linear_qkv.weight").mapping.heads

    n, types = config.num_layers, config.layer_types
    assert heads(f"decoder.layers.{types.index('full_attention')}") != heads(
        f"decoder.layers.{types.index('sliding_attention')}"
    )
    for j in range(config.mtp_num_layers):
        same_type = types.index(types[n + j])
        assert heads(f"mtp.layers.{j}.transformer_layer") == heads(f"decoder.layers.{same_type}"), j


def test_a_given_hf_prefix_is_used_as_given() -> None:
    table = MappingTable(step35_mappings(CONFIG, HF_KEYS, hf_prefix="other."))
    assert table.find("embedding.word_embeddings.weight").hf == ["other.embed_tokens.weight"]
