"""The mapping table against hand-built layouts, and its coverage of the models the specs build."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from qwen35_testing import read_config, read_tensors

import bridgecore_qwen35 as plugin
from bridgecore.errors import BridgeError
from bridgecore.mapping import MappingTable, Shard, TensorSource
from bridgecore.megatron.compat import cpu_compat
from bridgecore.megatron.parallel import Layout, init_model_parallel
from bridgecore.megatron.params import local_tensors
from bridgecore_qwen35 import tiny
from bridgecore_qwen35.mappings import VISION_TENSORS, experts_packed

K_HEADS, V_HEADS, DK, DV = tiny.K_HEADS, tiny.V_HEADS, tiny.K_DIM, tiny.V_DIM


@pytest.fixture(scope="module")
def dense(checkpoints: dict[str, Path]):
    hf = read_config(checkpoints["dense"])
    config = plugin.provider_config(hf_config=hf)
    tensors = read_tensors(checkpoints["dense"])
    return config, MappingTable(plugin.mapping_list(config=config, hf_keys=frozenset(tensors))), tensors


def _binding(table: MappingTable, name: str):
    binding = table.find(name)
    assert binding is not None, name
    return binding


def test_gdn_in_proj_packs_q_k_v_z_b_a_per_tp_rank(dense) -> None:
    """At TP=2 each rank holds [q_r, k_r, v_r, z_r, b_r, a_r]: its own key heads, then its value heads."""
    _, table, tensors = dense
    h = "model.layers.0.linear_attn."
    qkv, z = tensors[f"{h}in_proj_qkv.weight"], tensors[f"{h}in_proj_z.weight"]
    b, a = tensors[f"{h}in_proj_b.weight"], tensors[f"{h}in_proj_a.weight"]
    q, k, v = qkv[: K_HEADS * DK], qkv[K_HEADS * DK : 2 * K_HEADS * DK], qkv[2 * K_HEADS * DK :]
    binding = _binding(table, "decoder.layers.0.self_attention.in_proj.weight")
    source = TensorSource(tensors)
    kh, vh = K_HEADS // 2, V_HEADS // 2
    for r in range(2):
        expected = torch.cat(
            [
                q[r * kh * DK : (r + 1) * kh * DK],
                k[r * kh * DK : (r + 1) * kh * DK],
                v[r * vh * DV : (r + 1) * vh * DV],
                z[r * vh * DV : (r + 1) * vh * DV],
                b[r * vh : (r + 1) * vh],
                a[r * vh : (r + 1) * vh],
            ]
        )
        got = binding.mapping.to_megatron(source, binding.capture_dict, Shard(r, 2))
        assert torch.equal(got, expected)
    conv = tensors[f"{h}conv1d.weight"]
    cq, ck, cv = conv[: K_HEADS * DK], conv[K_HEADS * DK : 2 * K_HEADS * DK], conv[2 * K_HEADS * DK :]
    binding = _binding(table, "decoder.layers.0.self_attention.conv1d.weight")
    got = binding.mapping.to_megatron(source, binding.capture_dict, Shard(1, 2))
    assert torch.equal(got, torch.cat([cq[kh * DK :], ck[kh * DK :], cv[vh * DV :]]))


def test_gated_q_proj_interleave(dense) -> None:
    """q_proj rows are per head [q_h; gate_h]; Megatron groups [q heads, gate heads, k, v] per KV group."""
    _, table, tensors = dense
    h, d = "model.layers.3.self_attn.", tiny.HEAD_DIM
    q_proj = tensors[f"{h}q_proj.weight"].view(tiny.HEADS, 2, d, -1)
    k, v = (
        tensors[f"{h}k_proj.weight"].view(tiny.KV_HEADS, d, -1),
        tensors[f"{h}v_proj.weight"].view(tiny.KV_HEADS, d, -1),
    )
    per_group = tiny.HEADS // tiny.KV_HEADS
    groups = []
    for g in range(tiny.KV_HEADS):
        heads = range(g * per_group, (g + 1) * per_group)
        groups += [q_proj[i, 0] for i in heads] + [q_proj[i, 1] for i in heads] + [k[g], v[g]]
    binding = _binding(table, "decoder.layers.3.self_attention.linear_qkv.weight")
    got = binding.mapping.to_megatron(TensorSource(tensors), binding.capture_dict, Shard(0, 1))
    assert torch.equal(got, torch.cat(groups))


def test_gdn_norm_is_shifted_and_decay_split_by_value_head(dense) -> None:
    _, table, tensors = dense
    source, h = TensorSource(tensors), "model.layers.1.linear_attn."
    norm = _binding(table, "decoder.layers.1.self_attention.out_norm.weight")
    got = norm.mapping.to_megatron(source, norm.capture_dict, Shard(0, 2))
    assert torch.equal(got, tensors[f"{h}norm.weight"].float() - 1)
    a_log = _binding(table, "decoder.layers.1.self_attention.A_log")
    got = a_log.mapping.to_megatron(source, a_log.capture_dict, Shard(1, 2))
    assert torch.equal(got, tensors[f"{h}A_log"][V_HEADS // 2 :])


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", ["dense", "moe", "moe-vl"])
def test_mapping_level_roundtrip(checkpoints: dict[str, Path], built: dict, variant: str, tp: int) -> None:
    """Every param split over `tp` ranks and gathered back gives every HF tensor, bit for bit."""
    config, names = built[variant]
    tensors = read_tensors(checkpoints[variant])
    table = MappingTable(plugin.mapping_list(config=config, hf_keys=frozenset(tensors)))
    coverage = table.cover(names, tensors, allow_unmapped=[VISION_TENSORS])
    source, out = TensorSource(tensors), {}
    for b in coverage.bindings:
        size = tp if b.mapping.partition_dim is not None else 1
        shards = [b.mapping.to_megatron(source, b.capture_dict, Shard(r, size)) for r in range(size)]
        for piece in b.mapping.to_hf(shards, b.capture_dict):
            value = piece.tensor.to(tensors[piece.name].dtype)
            if piece.expert is None:
                out[piece.name] = value
            else:
                out.setdefault(piece.name, torch.empty(piece.full_shape, dtype=value.dtype))[piece.expert] = value
    assert sorted(out) == sorted(k for k in tensors if not k.startswith("model.visual."))
    for name, value in out.items():
        assert torch.equal(value, tensors[name]), name


@pytest.fixture(scope="module")
def built(checkpoints: dict[str, Path]) -> dict:
    """Megatron param names of each variant's model as the plugin's spec builds it (TP=1)."""
    init_model_parallel(Layout())
    out = {}
    for variant in ("dense", "moe", "moe-vl"):
        config = plugin.provider_config(hf_config=read_config(checkpoints[variant]))
        spec = plugin.layer_spec(config=config, vp_stage=None)
        with cpu_compat():
            model = config.build_model(spec.decoder, spec.mtp, pre_process=True, post_process=True, vp_stage=None)
        names = [t.name for t in local_tensors([model], config)]
        out[variant] = (config, names)
    return out


def test_gdn_params_kept_fp32(built: dict, checkpoints: dict[str, Path]) -> None:
    config = built["dense"][0]
    spec = plugin.layer_spec(config=config, vp_stage=None)
    with cpu_compat():
        model = config.build_model(spec.decoder, spec.mtp, pre_process=True, post_process=True, vp_stage=None)
    params = dict(model.named_parameters())
    for name in ("A_log", "dt_bias", "out_norm.weight"):
        assert params[f"decoder.layers.0.self_attention.{name}"].dtype == torch.float32
    assert params["decoder.layers.0.self_attention.in_proj.weight"].dtype == torch.bfloat16


def test_vision_tower_must_be_waived(checkpoints: dict[str, Path], built: dict) -> None:
    config, names = built["moe-vl"]
    keys = read_tensors(checkpoints["moe-vl"]).keys()
    table = MappingTable(plugin.mapping_list(config=config, hf_keys=frozenset(keys)))
    with pytest.raises(BridgeError, match=r"model\.visual\."):
        table.cover(names, keys)
    assert all(k.startswith("model.visual.") for k in table.cover(names, keys, [VISION_TENSORS]).waived_hf)


def test_expert_storage_detection() -> None:
    per_expert = ["model.layers.0.mlp.experts.0.gate_proj.weight", "mtp.layers.0.mlp.experts.gate_up_proj"]
    assert not experts_packed(per_expert, "model.layers.")
    assert experts_packed(per_expert, "mtp.layers.")
    assert experts_packed([], "model.layers.")  # export without a source: transformers' packed form
    with pytest.raises(BridgeError, match="both packed"):
        experts_packed(per_expert + ["model.layers.1.mlp.experts.gate_up_proj"], "model.layers.")


def test_attention_and_gdn_names_bind_only_on_their_own_layers(checkpoints: dict[str, Path]) -> None:
    """Layers 0-2 are GDN, layer 3 full attention: an attention name on a GDN layer (or the reverse)
    is no param of the model, and must stay unmapped rather than bind to the other kind's tensors.
    (The table is built here, not taken from the module's fixture, so mutation testing sees this test
    call the mappings.)"""
    config = plugin.provider_config(hf_config=read_config(checkpoints["dense"]))
    table = MappingTable(plugin.mapping_list(config=config, hf_keys=frozenset(read_tensors(checkpoints["dense"]))))
    attention = [
        "linear_qkv.layer_norm_weight",
        "linear_qkv.weight",
        "q_layernorm.weight",
        "k_layernorm.weight",
        "linear_proj.weight",
    ]
    gdn = [
        "in_proj.layer_norm_weight",
        "in_proj.weight",
        "conv1d.weight",
        "A_log",
        "dt_bias",
        "out_norm.weight",
        "out_proj.weight",
    ]
    for name in attention:
        assert _binding(table, f"decoder.layers.3.self_attention.{name}").hf[0].startswith("model.layers.3.")
        assert table.find(f"decoder.layers.2.self_attention.{name}") is None, name
    for name in gdn:
        assert _binding(table, f"decoder.layers.2.self_attention.{name}").hf[0].startswith("model.layers.2.")
        assert table.find(f"decoder.layers.3.self_attention.{name}") is None, name


def test_experts_in_both_forms_are_refused() -> None:
    keys = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.0.gate_proj.weight"]
    with pytest.raises(BridgeError) as refused:
        experts_packed(keys, "model.layers.")
    assert str(refused.value) == (
        "checkpoint stores the experts under model.layers.* both packed (experts.gate_up_proj)"
        " and per expert (experts.N.gate_proj.weight); expected one form"
    )
    assert experts_packed([], "mtp.layers.") and not experts_packed(keys[1:], "model.layers.")
