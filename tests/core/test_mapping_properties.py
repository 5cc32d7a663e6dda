"""Property tests: for every mapping type, random shapes and TP/EP sizes, export(import(x)) == x bit
for bit, and import reads no more than the rank's shard (the slices it needs, nothing else)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bridgecore.errors import BridgeError
from bridgecore.mapping import (
    Broadcast,
    ColumnParallel,
    Concat,
    Copies,
    FusedQKV,
    GatedMLP,
    MappingTable,
    PackedGatedMLP,
    Replicated,
    RowParallel,
    Shard,
    Shifted,
    Stacked,
    TensorSource,
)
from bridgecore.testing import check_mapping as assert_round_trip

TP_SIZES = st.sampled_from([1, 2, 4])
DTYPES = st.sampled_from([torch.bfloat16, torch.float32, torch.float16])


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 12), tp=TP_SIZES, dtype=DTYPES, seed=st.integers(0, 9))
def test_column_and_row_parallel(rows: int, cols: int, tp: int, dtype: torch.dtype, seed: int) -> None:
    x = random_tensor((rows * tp, cols * tp), dtype, seed)
    for kind in (ColumnParallel, RowParallel):
        assert_round_trip(kind("m.{layer}.w", "h.{layer}.w"), {"h.3.w": x}, {"layer": 3}, tp)


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=0, max_size=3), tp=TP_SIZES, dtype=DTYPES, seed=st.integers(0, 9))
def test_replicated(shape: list[int], tp: int, dtype: torch.dtype, seed: int) -> None:
    x = random_tensor(tuple(shape), dtype, seed)
    mapping = Replicated("m.norm", "h.norm")
    source = TensorSource({"h.norm": x})
    copies = [mapping.to_megatron(source, {}, Shard(r, tp)) for r in range(tp)]
    assert all(torch.equal(c, x) for c in copies)
    assert torch.equal(mapping.to_hf(copies[:1], {})[0].tensor, x)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 9), tp=TP_SIZES, dtype=DTYPES, seed=st.integers(0, 9))
def test_gated_mlp(rows: int, cols: int, tp: int, dtype: torch.dtype, seed: int) -> None:
    gate, up = random_tensor((rows * tp, cols), dtype, seed), random_tensor((rows * tp, cols), dtype, seed + 1)
    assert_round_trip(GatedMLP("m.fc1", "h.gate", "h.up"), {"h.gate": gate, "h.up": up}, {}, tp)
    packed = torch.cat([gate, up])
    assert_round_trip(PackedGatedMLP("m.fc1", "h.gate_up"), {"h.gate_up": packed}, {}, tp)


def test_gated_mlp_shard_is_gate_then_up() -> None:
    gate, up = torch.arange(4.0).view(4, 1), torch.arange(10.0, 14.0).view(4, 1)
    src = TensorSource({"g": gate, "u": up})
    shard1 = GatedMLP("m", "g", "u").to_megatron(src, {}, Shard(1, 2))
    assert shard1.flatten().tolist() == [2.0, 3.0, 12.0, 13.0]


@st.composite
def attention_shapes(draw):
    groups = draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.integers(1, 3))
    head_dim = draw(st.integers(1, 4))
    hidden = draw(st.integers(1, 8))
    tp = draw(
        st.sampled_from(
            [t for t in (1, 2, 4) if (groups * per_group) % t == 0 and (groups % t == 0 or t % groups == 0)]
        )
    )
    return groups * per_group, groups, head_dim, hidden, tp


@settings(max_examples=40, deadline=None)
@given(
    shape=attention_shapes(),
    gate=st.sampled_from([None, "in_q", "separate", "headwise"]),
    dtype=DTYPES,
    seed=st.integers(0, 9),
)
def test_fused_qkv(shape, gate, dtype, seed) -> None:
    heads, groups, d, hidden, tp = shape
    q_rows = heads * d * (2 if gate == "in_q" else 1)
    tensors = {
        "q": random_tensor((q_rows, hidden), dtype, seed),
        "k": random_tensor((groups * d, hidden), dtype, seed + 1),
        "v": random_tensor((groups * d, hidden), dtype, seed + 2),
    }
    g = None
    if gate in ("separate", "headwise"):
        g = "g"
        tensors["g"] = random_tensor((heads * d if gate == "separate" else heads, hidden), dtype, seed + 3)
    mapping = FusedQKV("m.qkv", "q", "k", "v", heads=heads, groups=groups, head_dim=d, gate=gate, g=g)
    assert_round_trip(mapping, tensors, {}, tp)


def test_fused_qkv_layout_matches_megatron_grouping() -> None:
    """Megatron keeps per query group [q heads, gate heads, k, v]; Qwen's q_proj is [q_h, gate_h] per head."""
    d = 1
    q = torch.tensor([[0.0], [100.0], [1.0], [101.0]])  # head 0: q 0, gate 100; head 1: q 1, gate 101
    k, v = torch.tensor([[10.0]]), torch.tensor([[20.0]])
    mapping = FusedQKV("m", "q", "k", "v", heads=2, groups=1, head_dim=d, gate="in_q")
    out = mapping.to_megatron(TensorSource({"q": q, "k": k, "v": v}), {}, Shard())
    assert out.flatten().tolist() == [0.0, 1.0, 100.0, 101.0, 10.0, 20.0]


def test_headwise_gate_expands_and_refuses_diverged_rows() -> None:
    q, k, v, g = torch.zeros(4, 1), torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([[5.0], [6.0]])
    mapping = FusedQKV("m", "q", "k", "v", heads=2, groups=1, head_dim=2, gate="headwise", g="g")
    out = mapping.to_megatron(TensorSource({"q": q, "k": k, "v": v, "g": g}), {}, Shard())
    assert out.flatten().tolist()[4:8] == [5.0, 5.0, 6.0, 6.0]
    out[5] = 7.0
    with pytest.raises(BridgeError, match="no longer equal"):
        mapping.to_hf([out], {})


@settings(max_examples=30, deadline=None)
@given(
    heads=st.sampled_from([(1, 1), (1, 2), (2, 2), (1, 4)]),
    dims=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    hidden=st.integers(1, 6),
    tp=TP_SIZES,
    dtype=DTYPES,
    seed=st.integers(0, 9),
)
def test_concat_gdn_in_proj(heads, dims, hidden, tp, dtype, seed) -> None:
    """The GDN in_proj form: q|k|v rows of one tensor plus z, b, a, each split over TP on its own.

    Head counts are drawn per TP rank (Megatron splits whole heads), so every example runs."""
    nk, nv = heads[0] * tp, heads[1] * tp
    dk, dv = dims
    qkv = random_tensor((2 * nk * dk + nv * dv, hidden), dtype, seed)
    z, b, a = (
        random_tensor(s, dtype, seed + i) for i, s in enumerate([(nv * dv, hidden), (nv, hidden), (nv, hidden)], 1)
    )
    components = [
        (0, 0, nk * dk),
        (0, nk * dk, nk * dk),
        (0, 2 * nk * dk, nv * dv),
        (1, 0, nv * dv),
        (2, 0, nv),
        (3, 0, nv),
    ]
    mapping = Concat("m.in_proj", ["qkv", "z", "b", "a"], components)
    assert_round_trip(mapping, {"qkv": qkv, "z": z, "b": b, "a": a}, {}, tp)


@settings(max_examples=30, deadline=None)
@given(
    experts=st.sampled_from([2, 4, 6]), ep=st.sampled_from([1, 2]), tp=TP_SIZES, dtype=DTYPES, seed=st.integers(0, 9)
)
def test_stacked_experts_over_ep_and_tp(experts: int, ep: int, tp: int, dtype: torch.dtype, seed: int) -> None:
    rows, cols = 2 * tp, 3
    gate = random_tensor((experts, rows, cols), dtype, seed)
    up = random_tensor((experts, rows, cols), dtype, seed + 1)
    down = random_tensor((experts, cols, rows), dtype, seed + 2)
    tensors = {"l.1.gate": gate, "l.1.up": up, "l.1.down": down}
    fc1 = Stacked(GatedMLP("d.{layer}.e.{expert}.fc1", "l.{layer}.gate", "l.{layer}.up"), experts)
    fc2 = Stacked(RowParallel("d.{layer}.e.{expert}.fc2", "l.{layer}.down"), experts)
    local = experts // ep
    for ep_rank in range(ep):
        for e in range(ep_rank * local, (ep_rank + 1) * local):
            for mapping in (fc1, fc2):
                assert_round_trip(mapping, tensors, {"layer": 1, "expert": e}, tp)


def test_stacked_expert_count_mismatch_names_tensor() -> None:
    mapping = Stacked(ColumnParallel("e.{expert}.w", "stacked"), num_experts=4)
    with pytest.raises(BridgeError, match="stacked.*expected 4 experts"):
        mapping.to_megatron(TensorSource({"stacked": torch.zeros(3, 2, 2)}), {"expert": 0}, Shard())


@settings(max_examples=30, deadline=None)
@given(
    experts=st.sampled_from([2, 4, 6]),
    ep=st.sampled_from([1, 2]),
    tp=TP_SIZES,
    shape=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    dtype=DTYPES,
    seed=st.integers(0, 9),
)
def test_broadcast_over_experts(
    experts: int, ep: int, tp: int, shape: list[int], dtype: torch.dtype, seed: int
) -> None:
    """One HF tensor read into every expert's param; export writes it once, from expert 0, and
    refuses, naming the tensor, once any copy on any EP rank differs."""
    x = random_tensor(tuple(shape), dtype, seed)
    split = random_tensor((2 * tp, 3), dtype, seed + 1)
    mappings = [
        Broadcast(Replicated("d.{layer}.e.{expert}.amax", "l.{layer}.shared_amax")),
        Broadcast(ColumnParallel("d.{layer}.e.{expert}.w", "l.{layer}.shared_w")),
    ]
    tensors = {"l.1.shared_amax": x, "l.1.shared_w": split}
    local = experts // ep
    ranks = [Copies() for _ in range(ep)]
    written = []
    for ep_rank, copies in enumerate(ranks):
        for e in range(ep_rank * local, (ep_rank + 1) * local):
            for mapping in mappings:
                size = tp if mapping.partition_dim is not None else 1
                shards = assert_round_trip(mapping, tensors, {"layer": 1, "expert": e}, size)
                written += [p.name for p in mapping.to_hf(shards, {"layer": 1, "expert": e}) if copies.keep(p)]
    assert sorted(written) == sorted(tensors)  # each once, by expert 0's rank
    Copies.check(c.digests for c in ranks)
    ranks[-1].keep(mappings[0].to_hf([x + 1], {"layer": 1, "expert": experts - 1})[0])
    with pytest.raises(BridgeError, match=rf"l\.1\.shared_amax: .* expert {experts - 1} differ from expert 0's"):
        Copies.check(c.digests for c in ranks)


def test_broadcast_needs_a_capture_the_hf_names_lack() -> None:
    with pytest.raises(ValueError, match="needs it in the Megatron pattern"):
        Broadcast(Replicated("d.amax", "l.amax"))
    with pytest.raises(ValueError, match="carry no"):
        Broadcast(Replicated("d.{expert}.amax", "l.{expert}.amax"))


@settings(max_examples=30, deadline=None)
@given(size=st.integers(1, 8), tp=TP_SIZES, seed=st.integers(0, 9))
def test_shifted_norm_is_exact_in_its_domain(size: int, tp: int, seed: int) -> None:
    """w -> w-1 -> w is exact in bf16 for w in [0.5, 2] (Sterbenz), the range of plain norm weights."""
    g = torch.Generator().manual_seed(seed)
    w = (0.5 + 1.5 * torch.rand(size * tp, generator=g)).to(torch.bfloat16)
    mapping = Shifted(ColumnParallel("m.out_norm", "h.norm"), -1.0)
    source = TensorSource({"h.norm": w})
    shards = [mapping.to_megatron(source, {}, Shard(r, tp)).to(torch.bfloat16) for r in range(tp)]
    assert all(torch.equal(s.float(), s.float().to(torch.bfloat16).float()) for s in shards)
    back = mapping.to_hf(shards, {})[0].tensor.to(torch.bfloat16)
    assert torch.equal(back, w)


def test_table_rejects_ambiguous_and_reports_coverage() -> None:
    table = MappingTable([Replicated("a.{layer}.w", "x.{layer}"), Replicated("a.{n}.w", "y.{n}")])
    with pytest.raises(BridgeError, match="matches 2 mappings"):
        table.find("a.0.w")
    table = MappingTable([Replicated("a.{layer}.w", "x.{layer}")])
    with pytest.raises(BridgeError, match="1 Megatron params have no mapping: b.w"):
        table.cover(["a.0.w", "b.w"], {"x.0"})
    with pytest.raises(BridgeError, match="checkpoint lacks 1 tensors.*x.1"):
        table.cover(["a.0.w", "a.1.w"], {"x.0"})
    with pytest.raises(BridgeError, match="2 checkpoint tensors are not mapped: extra.a, extra.b"):
        table.cover(["a.0.w"], {"x.0", "extra.a", "extra.b"})
    coverage = table.cover(["a.0.w"], {"x.0", "extra.a"}, allow_unmapped=["extra.*"])
    assert coverage.waived_hf == ["extra.a"]


def test_hf_offsets_and_layer_restriction() -> None:
    mapping = Replicated("mtp.layers.{mtp}.enorm.weight", "model.layers.{mtp+45}.enorm.weight")
    assert mapping.hf_names({"mtp": 2}) == ["model.layers.47.enorm.weight"]
    full = Replicated("d.layers.{layer}.w", "h.{layer}", layers=[0, 4])
    assert full.match("d.layers.4.w") == {"layer": 4}
    assert full.match("d.layers.1.w") is None
