"""Amax mappings derived from a Llama-style + MoE mapping set: import then export is bit-exact.

Every Megatron amax is imported rank by rank (TP 1 and 2; EP 1 and 2 deal the experts out to ranks)
from a calibrated HF state, then exported from the gathered shards and compared with the source.
Per-tensor amax differ within a fused group, as ModelOpt calibrates each HF linear on its own: the
fused quantizer holds their max and ``_amax_parts`` each one.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from bridgecore.errors import BridgeError
from bridgecore.mapping import (
    ColumnParallel,
    Copies,
    FusedQKV,
    GatedMLP,
    MappingTable,
    Replicated,
    RowParallel,
    Shard,
    Stacked,
    TensorSource,
)
from bridgecore_quant.amax import Amax, AmaxParts, amax_mappings, is_per_tensor
from bridgecore_quant.state import fused_notes

H, HEADS, GROUPS, D, INTER, E, LAYERS, V = 32, 4, 2, 8, 16, 4, 2, 64


def weight_mappings() -> list:
    L, HL = "decoder.layers.{layer}.", "model.layers.{layer}."
    ex = L + "mlp.experts.local_experts.{expert}."
    return [
        ColumnParallel("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        Replicated(L + "input_layernorm.weight", HL + "input_layernorm.weight"),
        FusedQKV(
            L + "self_attention.linear_qkv.weight",
            *(HL + f"self_attn.{p}_proj.weight" for p in "qkv"),
            heads=HEADS,
            groups=GROUPS,
            head_dim=D,
        ),
        RowParallel(L + "self_attention.linear_proj.weight", HL + "self_attn.o_proj.weight"),
        Replicated(L + "mlp.router.weight", HL + "mlp.gate.weight", layers=[0]),
        GatedMLP(
            ex + "linear_fc1.weight",
            HL + "mlp.experts.{expert}.gate_proj.weight",
            HL + "mlp.experts.{expert}.up_proj.weight",
            layers=[0],
        ),
        RowParallel(ex + "linear_fc2.weight", HL + "mlp.experts.{expert}.down_proj.weight", layers=[0]),
        Stacked(
            GatedMLP(ex + "linear_fc1.weight", HL + "moe.gate_proj.weight", HL + "moe.up_proj.weight", layers=[1]), E
        ),
        Stacked(RowParallel(ex + "linear_fc2.weight", HL + "moe.down_proj.weight", layers=[1]), E),
        ColumnParallel("output_layer.weight", "lm_head.weight"),
    ]


def hf_linears() -> dict[str, tuple[int, ...]]:
    """HF quantized linear module -> weight shape (stacked ones lead with E)."""
    out = {}
    for n in range(LAYERS):
        p = f"model.layers.{n}."
        out |= {
            p + "self_attn.q_proj": (HEADS * D, H),
            p + "self_attn.k_proj": (GROUPS * D, H),
            p + "self_attn.v_proj": (GROUPS * D, H),
            p + "self_attn.o_proj": (H, HEADS * D),
        }
    for e in range(E):
        p = f"model.layers.0.mlp.experts.{e}."
        out |= {p + "gate_proj": (INTER, H), p + "up_proj": (INTER, H), p + "down_proj": (H, INTER)}
    p = "model.layers.1.moe."
    out |= {p + "gate_proj": (E, INTER, H), p + "up_proj": (E, INTER, H), p + "down_proj": (E, H, INTER)}
    return out


FUSED = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]


def calibrated(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF amax tensors, one draw per HF linear (per-channel weight amax: one per row)."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=g) + 0.1

    out = {}
    for module, shape in hf_linears().items():
        stacked = len(shape) == 3
        lead = shape[:1] if stacked else ()
        for q in ("weight_quantizer", "input_quantizer"):
            if kind == "per_channel" and q == "weight_quantizer":
                value = draw(*lead, shape[-2], 1)
            else:
                value = draw(*lead) if stacked else draw(*((1,) if kind == "scalar1" else ()))
            out[f"{module}.{q}._amax"] = value
    for n in range(LAYERS):
        for s in ("k_bmm_quantizer", "v_bmm_quantizer"):
            out[f"model.layers.{n}.self_attn.{s}._amax"] = draw()
    return out


def megatron_names(kind: str) -> list[str]:
    """The Megatron amax buffers, with ``_amax_parts`` beside every fused per-tensor one."""
    names = []
    for n in range(LAYERS):
        L = f"decoder.layers.{n}."
        mods = [L + "self_attention.linear_qkv", L + "self_attention.linear_proj"]
        mods += [L + f"mlp.experts.local_experts.{e}.linear_fc{k}" for e in range(E) for k in (1, 2)]
        names += [f"{m}.{q}._amax" for m in mods for q in ("weight_quantizer", "input_quantizer")]
        fused = [m for m in mods if m.endswith(("linear_qkv", "linear_fc1"))]
        quantizers = ["input_quantizer"] if kind == "per_channel" else ["weight_quantizer", "input_quantizer"]
        names += [f"{m}.{q}._amax_parts" for m in fused for q in quantizers]
        names += [L + f"self_attention.core_attention.{s}._amax" for s in ("k_bmm_quantizer", "v_bmm_quantizer")]
    return names


def imported(hf: dict[str, torch.Tensor], kind: str, tp: int) -> dict[str, list[torch.Tensor]]:
    """Every Megatron amax buffer, imported from ``hf``: its shards over TP, in rank order."""
    table = MappingTable(amax_mappings(weight_mappings()))
    source, out = TensorSource(hf), {}
    for name in megatron_names(kind):
        b = table.find(name)
        assert b is not None, name
        inner = b.mapping.inner if isinstance(b.mapping, Stacked) else b.mapping
        hf_shape = source.shape(b.hf[0])[1:] if isinstance(b.mapping, Stacked) else source.shape(b.hf[0])
        size = tp if isinstance(inner, Amax) and inner.splits(hf_shape) else 1
        out[name] = [b.mapping.to_megatron(source, b.capture_dict, Shard(r, size)) for r in range(size)]
    return out


def exported(megatron: dict[str, list[torch.Tensor]], ep: int, copies: Copies | None = None) -> dict[str, torch.Tensor]:
    """The HF amax tensors exported from ``megatron`` as the export paths do: each mapping gets the
    whole values of the params it needs (None for one absent), pieces pass through ``copies``."""
    table = MappingTable(amax_mappings(weight_mappings()))
    out, slabs = {}, {}
    per_rank = E // ep
    for name, shards in megatron.items():
        b = table.find(name)
        needs = b.mapping.needs(b.capture_dict)
        given = ([torch.cat(megatron[n]) if n in megatron else None for n in needs],) if needs else ()
        # EP: an expert lives on rank expert // per_rank, which alone exports it.
        rank = b.capture_dict.get("expert", 0) // per_rank
        for piece in b.mapping.to_hf(shards, b.capture_dict, *given):
            if copies is not None:
                copies.keep(piece)
            if piece.expert is None:
                assert piece.name not in out or torch.equal(out[piece.name], piece.tensor)
                out[piece.name] = piece.tensor
            else:
                slabs.setdefault(piece.name, {})[piece.expert] = (rank, piece.tensor)
    for name, parts in slabs.items():
        assert sorted(parts) == list(range(E)), name
        assert {r for r, _ in parts.values()} == set(range(ep))
        out[name] = torch.stack([parts[e][1] for e in range(E)])
    return out


def roundtrip(hf: dict[str, torch.Tensor], kind: str, tp: int, ep: int) -> dict[str, torch.Tensor]:
    return exported(imported(hf, kind, tp), ep)


@pytest.mark.parametrize("kind", ["scalar", "scalar1", "per_channel"])
@pytest.mark.parametrize("tp,ep", list(itertools.product([1, 2], [1, 2])))
def test_amax_roundtrip_is_bit_exact(kind: str, tp: int, ep: int) -> None:
    hf = calibrated(kind)
    back = roundtrip(hf, kind, tp, ep)
    assert sorted(back) == sorted(hf)
    for name, tensor in hf.items():
        assert back[name].shape == tensor.shape and back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name


def test_per_channel_qkv_amax_is_laid_out_like_the_weight() -> None:
    hf = calibrated("per_channel")
    qkv = weight_mappings()[2]
    table = MappingTable(amax_mappings([qkv]))
    b = table.find("decoder.layers.0.self_attention.linear_qkv.weight_quantizer._amax")
    rows = {p: hf[f"model.layers.0.self_attn.{p}_proj.weight_quantizer._amax"] for p in "qkv"}
    weights = {f"model.layers.0.self_attn.{p}_proj.weight": rows[p].expand(-1, H) for p in "qkv"}
    for r in range(2):
        amax = b.mapping.to_megatron(TensorSource(hf), b.capture_dict, Shard(r, 2))
        weight = qkv.to_megatron(TensorSource(weights), b.capture_dict, Shard(r, 2))
        assert torch.equal(amax.expand(-1, H), weight)


def test_fused_quantizer_takes_the_max_and_exports_the_parts_kept_beside_it() -> None:
    hf = calibrated("scalar")
    names = [f"model.layers.0.self_attn.{p}_proj.input_quantizer._amax" for p in "qkv"]
    hf[names[1]] = torch.tensor(9.0)
    table = MappingTable(amax_mappings(weight_mappings(), frozenset(hf)))
    b = table.find("decoder.layers.0.self_attention.linear_qkv.input_quantizer._amax")
    amax = b.mapping.to_megatron(TensorSource(hf), b.capture_dict, Shard())
    assert torch.equal(amax, torch.tensor(9.0))
    parts = table.find("decoder.layers.0.self_attention.linear_qkv.input_quantizer._amax_parts")
    assert isinstance(parts.mapping, AmaxParts)
    assert b.mapping.needs(b.capture_dict) == [parts.megatron]
    values = parts.mapping.to_megatron(TensorSource(hf), parts.capture_dict, Shard())
    assert torch.equal(values, torch.stack([hf[n] for n in names]))
    assert parts.mapping.to_hf([values], parts.capture_dict) == []  # the quantizer's mapping writes them
    pieces = b.mapping.to_hf([amax], b.capture_dict, [values])
    assert [(p.name, p.tensor, p.note) for p in pieces] == [(n, hf[n], None) for n in names]


def test_stacked_parts_write_every_target_slab() -> None:
    table = MappingTable(amax_mappings(weight_mappings()))
    b = table.find("decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight_quantizer._amax")
    pieces = b.mapping.to_hf([torch.tensor(0.5)], b.capture_dict, [torch.tensor([0.5, 0.25])])
    assert [(p.name, p.expert, p.num_experts, p.tensor.item()) for p in pieces] == [
        ("model.layers.1.moe.gate_proj.weight_quantizer._amax", 2, E, 0.5),
        ("model.layers.1.moe.up_proj.weight_quantizer._amax", 2, E, 0.25),
    ]


@pytest.mark.parametrize("quantizer", ["weight_quantizer", "input_quantizer"])
def test_a_fused_amax_changed_after_import_is_exported_for_every_linear_of_its_group(quantizer: str) -> None:
    """Recalibration in Megatron changes ``_amax``; the parts kept at import no longer hold."""
    hf = calibrated("scalar")
    megatron = imported(hf, "scalar", tp=2)
    qkv = f"decoder.layers.0.self_attention.linear_qkv.{quantizer}._amax"
    fc1 = f"decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.{quantizer}._amax"
    fc2 = f"decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.{quantizer}._amax"
    for name in (qkv, fc1, fc2):
        megatron[name] = [torch.full_like(s, 7.5) for s in megatron[name]]
    copies = Copies()
    out = exported(megatron, ep=2, copies=copies)
    for p in "qkv":
        assert out[f"model.layers.0.self_attn.{p}_proj.{quantizer}._amax"].item() == 7.5
    for p in ("gate_proj", "up_proj"):
        name = f"model.layers.1.moe.{p}.{quantizer}._amax"
        assert out[name][3].item() == 7.5 and torch.equal(out[name][:3], hf[name][:3])
    assert out[f"model.layers.0.mlp.experts.1.down_proj.{quantizer}._amax"].item() == 7.5
    # the unchanged groups keep their own values
    for p in "qkv":
        name = f"model.layers.1.self_attn.{p}_proj.{quantizer}._amax"
        assert torch.equal(out[name], hf[name])
    (line,) = Copies.said([copies.notes])
    assert "changed after import" in line and line.endswith(f": {qkv}, {fc1}")


def test_a_checkpoint_without_parts_exports_the_fused_amax_for_every_linear() -> None:
    """Megatron-LM with ModelOpt saves ``_amax`` only."""
    hf = calibrated("scalar")
    megatron = {n: v for n, v in imported(hf, "scalar", tp=1).items() if not n.endswith("_parts")}
    copies = Copies()
    out = exported(megatron, ep=1, copies=copies)
    assert sorted(out) == sorted(hf)
    for n in range(LAYERS):
        group = [hf[f"model.layers.{n}.self_attn.{p}_proj.weight_quantizer._amax"] for p in "qkv"]
        for p in "qkv":
            assert torch.equal(out[f"model.layers.{n}.self_attn.{p}_proj.weight_quantizer._amax"], max(group))
    name = "model.layers.0.self_attn.o_proj.weight_quantizer._amax"
    assert torch.equal(out[name], hf[name])
    (line,) = Copies.said([copies.notes])
    assert "keeps no per-linear amax" in line and line.endswith("more")


def test_fused_parts_without_amax_are_left_out() -> None:
    """ModelOpt leaves some fused HF linears unquantized (GDN in_proj_a/b): no amax, so not mapped."""
    hf = {k: v for k, v in calibrated("scalar").items() if ".v_proj." not in k}
    table = MappingTable(amax_mappings(weight_mappings(), frozenset(hf)))
    b = table.find("decoder.layers.0.self_attention.linear_qkv.weight_quantizer._amax")
    assert b.hf == [f"model.layers.0.self_attn.{p}_proj.weight_quantizer._amax" for p in "qk"]
    assert [p.text for p in b.mapping.absent] == ["model.layers.{layer}.self_attn.v_proj.weight_quantizer._amax"]
    amax = b.mapping.to_megatron(TensorSource(hf), b.capture_dict, Shard())
    assert torch.equal(amax, torch.maximum(hf[b.hf[0]], hf[b.hf[1]]))


def test_import_notes_say_what_the_fused_quantizers_change() -> None:
    hf = {k: torch.ones_like(v) for k, v in calibrated("scalar").items() if ".v_proj." not in k}
    hf["model.layers.1.self_attn.k_proj.weight_quantizer._amax"] = torch.tensor(4.0)
    table = MappingTable(amax_mappings(weight_mappings(), frozenset(hf)))
    differ, partial = fused_notes(table, TensorSource(hf), frozenset(hf))
    pair = "model.layers.1.self_attn.q_proj.weight_quantizer._amax, model.layers.1.self_attn.k_proj"
    assert differ.startswith("1 of ") and f"largest ratio 4: {pair}" in differ
    assert (
        "e.g. model.layers.0.self_attn.v_proj.weight_quantizer._amax;"
        " its quantizer is decoder.layers.0.self_attention.linear_qkv.weight_quantizer._amax" in partial
    )


def test_only_linears_get_amax_mappings() -> None:
    derived = {m.megatron.text for m in amax_mappings(weight_mappings())}
    assert not any("norm" in t or "embedding" in t for t in derived)
    assert "output_layer.weight_quantizer._amax" in derived
    assert "decoder.layers.{layer}.self_attention.core_attention.k_bmm_quantizer._amax" in derived
    assert is_per_tensor(()) and is_per_tensor((1,)) and not is_per_tensor((4, 1))


def fused_experts_calibrated(seed: int = 0) -> dict[str, torch.Tensor]:
    """The experts' amax as ModelOpt's ``save_pretrained`` names those of transformers' fused experts:
    bf16 ``[]``, one weight amax per expert (gate and up together), one input amax for all experts,
    under ``mlp.experts`` whether the weights are per expert (layer 0) or stacked as ``moe.*`` (layer 1,
    Step-3.7's released layout)."""
    g = torch.Generator().manual_seed(seed)
    hf = {k: v for k, v in calibrated("scalar", seed).items() if ".mlp.experts." not in k and ".moe." not in k}
    for layer in (0, 1):
        p = f"model.layers.{layer}.mlp.experts."
        for fused in ("gate_up_proj", "down_proj"):
            for e in range(E):
                hf[f"{p}{fused}_weight_quantizers.{e}._amax"] = (torch.rand((), generator=g) + 0.1).to(torch.bfloat16)
            hf[f"{p}{fused}_input_quantizer._amax"] = (torch.rand((), generator=g) + 1).to(torch.bfloat16)
    return hf


@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 2)])
def test_fused_experts_amax_map_per_expert_and_share_the_input_amax(tp: int, ep: int) -> None:
    """Each expert's quantizer takes its own weight amax and a copy of the layer's input amax; export
    gives back every HF tensor once (the input amax from expert 0), and refuses diverged copies."""
    hf = fused_experts_calibrated()
    table = MappingTable(amax_mappings(weight_mappings(), frozenset(hf)))
    names = [n for n in megatron_names("scalar") if ".mlp.experts." not in n or not n.endswith("_parts")]
    table.cover(names, frozenset(hf))  # every Megatron buffer bound, every HF amax used
    source, out, ranks = TensorSource(hf), {}, [Copies() for _ in range(ep)]
    whole = {n: table.find(n).mapping.to_megatron(source, table.find(n).capture_dict, Shard()) for n in names}
    for name in names:
        b = table.find(name)
        shards = [b.mapping.to_megatron(source, b.capture_dict, Shard(r, tp)) for r in range(tp)]
        if ".mlp.experts." in name:
            fused = "gate_up_proj" if "linear_fc1" in name else "down_proj"
            layer, expert = b.capture_dict["layer"], b.capture_dict["expert"]
            want = f"{fused}_weight_quantizers.{expert}" if "weight_quantizer" in name else f"{fused}_input_quantizer"
            assert all(torch.equal(s, hf[f"model.layers.{layer}.mlp.experts.{want}._amax"]) for s in shards), name
        copies = ranks[b.capture_dict.get("expert", 0) // (E // ep)]
        needs = b.mapping.needs(b.capture_dict)
        for piece in b.mapping.to_hf(shards, b.capture_dict, *([[whole[n] for n in needs]] if needs else [])):
            if copies.keep(piece):
                assert piece.name not in out and piece.expert is None, f"{piece.name} written twice"
                out[piece.name] = piece.tensor
    Copies.check(c.digests for c in ranks)
    assert sorted(out) == sorted(hf)
    assert all(torch.equal(out[name], tensor) for name, tensor in hf.items())
    b = table.find("decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.input_quantizer._amax")
    ranks[-1].keep(b.mapping.to_hf([torch.tensor(5.0, dtype=torch.bfloat16)], b.capture_dict)[0])
    diverged = r"experts\.down_proj_input_quantizer\._amax: .* expert 3 differ from expert 0"
    with pytest.raises(BridgeError, match=diverged):
        Copies.check(c.digests for c in ranks)


def test_fused_experts_amax_convert_per_tensor_only() -> None:
    hf = fused_experts_calibrated()
    hf["model.layers.0.mlp.experts.down_proj_weight_quantizers.1._amax"] = torch.ones(H, 1)
    b = MappingTable(amax_mappings(weight_mappings(), frozenset(hf))).find(
        "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight_quantizer._amax"
    )
    with pytest.raises(
        BridgeError, match=r"down_proj_weight_quantizers\.1\._amax: shape \[32, 1\]; .* per tensor only"
    ):
        b.mapping.to_megatron(TensorSource(hf), b.capture_dict, Shard())
