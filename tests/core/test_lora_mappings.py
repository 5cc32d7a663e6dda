"""LoRA weights mapped through their linear's mapping, pinned by what a LoRA adapter must do.

Merging commutes with the mapping: on every TP rank, the Megatron weight shard plus the delta its
adapter shards make (a column-parallel linear: this rank's B rows times the gathered A; a
row-parallel one: the gathered B times this rank's A columns) equals the shard the base mapping
makes from the merged HF weights ``W_i + B_i @ A_i``. Values are small integers in float64, so
every product and sum is exact and the comparison is equality. Export gives back what import read.
"""

from __future__ import annotations

import pytest
import torch

from bridgecore.errors import BridgeError
from bridgecore.mapping import (
    ColumnParallel,
    Concat,
    FusedQKV,
    GatedMLP,
    Mapping,
    Replicated,
    RowParallel,
    Shard,
    Stacked,
    TensorSource,
)
from bridgecore.mapping.lora import LoRAWeight, lora_mappings

COLS, RANK, TP = 6, 2, 2


def ints(*shape: int, seed: int) -> torch.Tensor:
    return torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(seed)).double()


def gdn_in_proj() -> Concat:
    nk, nv, dk, dv = 2, 4, 2, 3
    components = [(0, 0, nk * dk), (0, nk * dk, nk * dk), (0, 2 * nk * dk, nv * dv), (1, 0, nv * dv), (2, 0, nv)]
    return Concat(
        "l.in_proj.weight", ["h.qkv.weight", "h.z.weight", "h.b.weight", "h.a.weight"], [*components, (3, 0, nv)]
    )


#: (mapping, rows of each HF weight)
COLUMN = {
    "qkv": (
        FusedQKV("l.qkv.weight", "h.q.weight", "h.k.weight", "h.v.weight", heads=8, groups=4, head_dim=2),
        [16, 8, 8],
    ),
    "qkv+head gate": (
        FusedQKV("l.qkv.weight", "h.q.weight", "h.k.weight", "h.v.weight", heads=4, groups=2, head_dim=2,
                 gate="headwise", g="h.g.weight"),
        [8, 4, 4, 4],
    ),
    "gated fc1": (GatedMLP("l.fc1.weight", "h.gate.weight", "h.up.weight"), [6, 6]),
    "gdn in_proj": (gdn_in_proj(), [20, 12, 4, 4]),
    "column": (ColumnParallel("l.w.weight", "h.w.weight"), [4]),
}  # fmt: skip


def _hf(mapping: Mapping, captures: dict[str, int]) -> list[str]:
    return [n.removesuffix(".weight") for n in mapping.hf_names(captures)]


@pytest.mark.parametrize("kind", sorted(COLUMN))
def test_column_parallel_adapter_merges_as_its_weight(kind: str) -> None:
    base, rows = COLUMN[kind]
    modules = _hf(base, {})
    weights = {f"{m}.weight": ints(n, COLS, seed=i) for i, (m, n) in enumerate(zip(modules, rows, strict=True))}
    a = ints(RANK, COLS, seed=10)
    b = {m: ints(n, RANK, seed=20 + i) for i, (m, n) in enumerate(zip(modules, rows, strict=True))}
    lora = TensorSource({**{f"{m}.lora_A.weight": a for m in modules}, **{f"{m}.lora_B.weight": b[m] for m in modules}})
    merged = TensorSource({f"{m}.weight": weights[f"{m}.weight"] + b[m] @ a for m in modules})
    la, lb = LoRAWeight(base, "A"), LoRAWeight(base, "B")
    assert (la.partition_dim, lb.partition_dim) == (0, 0)
    a_shards = [la.to_megatron(lora, {}, Shard(t, TP)) for t in range(TP)]
    b_shards = [lb.to_megatron(lora, {}, Shard(t, TP)) for t in range(TP)]
    assert torch.equal(torch.cat(a_shards), a)  # linear_in's rank rows, gathered
    for t in range(TP):
        shard = base.to_megatron(TensorSource(weights), {}, Shard(t, TP))
        assert torch.equal(shard + b_shards[t] @ torch.cat(a_shards), base.to_megatron(merged, {}, Shard(t, TP)))
    back_a = {p.name: p.tensor for p in la.to_hf(a_shards, {})}
    back_b = {p.name: p.tensor for p in lb.to_hf(b_shards, {})}
    assert set(back_a) == {f"{m}.lora_A.weight" for m in modules} == {n.replace("_B", "_A") for n in back_b}
    for m in modules:
        assert torch.equal(back_a[f"{m}.lora_A.weight"], a)
        assert torch.equal(back_b[f"{m}.lora_B.weight"], b[m])


def test_row_parallel_adapter_merges_as_its_weight() -> None:
    base = RowParallel("l.proj.weight", "h.o.weight")
    weight, a, b = ints(5, COLS, seed=1), ints(3, COLS, seed=2), ints(5, 3, seed=3)
    lora = TensorSource({"h.o.lora_A.weight": a, "h.o.lora_B.weight": b})
    la, lb = LoRAWeight(base, "A"), LoRAWeight(base, "B")
    assert (la.partition_dim, lb.partition_dim) == (1, 0)
    # B's rows split evenly (linear_out gathers them); a rank that is odd is fine for a row-parallel linear
    a_shards = [la.to_megatron(lora, {}, Shard(t, TP)) for t in range(TP)]
    with pytest.raises(BridgeError, match="5 rows do not split over TP=2"):
        lb.to_megatron(lora, {}, Shard(0, TP))
    b_full = lb.to_megatron(lora, {}, Shard(0, 1))
    merged = TensorSource({"h.o.weight": weight + b @ a})
    for t in range(TP):
        shard = base.to_megatron(TensorSource({"h.o.weight": weight}), {}, Shard(t, TP))
        assert torch.equal(shard + b_full @ a_shards[t], base.to_megatron(merged, {}, Shard(t, TP)))
    assert torch.equal(la.to_hf(a_shards, {})[0].tensor, a)
    assert [p.name for p in lb.to_hf([b_full], {})] == ["h.o.lora_B.weight"]


def test_a_head_gate_b_that_differs_within_a_head_is_refused_by_name() -> None:
    base = FusedQKV("l.qkv.weight", "h.q.weight", "h.k.weight", "h.v.weight", heads=4, groups=2, head_dim=2,
                    gate="headwise", g="h.g.weight")  # fmt: skip
    lb = LoRAWeight(base, "B")
    rows = 8 + 4 + 4 + 4 * 2  # q, k, v and the gate's head rows expanded over head_dim
    with pytest.raises(BridgeError, match=r"l\.qkv\.adapter\.linear_out\.weight: laid out as its linear's weight"):
        lb.to_hf([ints(rows, RANK, seed=5)], {})


def test_patterns_and_layers_carry_over() -> None:
    base = ColumnParallel("decoder.layers.{layer}.x.weight", "model.layers.{layer}.x.weight", layers=[1, 3])
    la = LoRAWeight(base, "A")
    assert la.megatron.text == "decoder.layers.{layer}.x.adapter.linear_in.weight"
    assert la.hf_names({"layer": 3}) == ["model.layers.3.x.lora_A.weight"]
    assert la.match("decoder.layers.3.x.adapter.linear_in.weight") == {"layer": 3}
    assert la.match("decoder.layers.2.x.adapter.linear_in.weight") is None
    assert repr(la) == f"LoRAA({base!r})"


def test_what_cannot_carry_an_adapter_is_named() -> None:
    mappings, refused = lora_mappings(
        [
            ColumnParallel("l.w.weight", "h.w.weight"),
            Replicated("l.norm.weight", "h.norm.weight"),  # not split over TP: no adapter, no refusal
            ColumnParallel("l.b.bias", "h.b.bias"),  # not a weight
            Stacked(ColumnParallel("e.{expert}.w.weight", "h.experts.w.weight"), 4),
            ColumnParallel("l.packed.weight", "h.gate_up_proj"),
        ]
    )
    assert [repr(m) for m in mappings] == [
        "LoRAA(ColumnParallel(l.w.weight <- h.w.weight))",
        "LoRAB(ColumnParallel(l.w.weight <- h.w.weight))",
        "LoRAM(ColumnParallel(l.w.weight <- h.w.weight))",
    ]
    assert [m.megatron.text for m, _ in refused] == ["e.{expert}.w.weight", "l.packed.weight"]
    assert "only a linear split over TP by rows or columns" in refused[0][1]
    assert "h.gate_up_proj is not a linear's weight" in refused[1][1]


@pytest.mark.parametrize("kind", sorted(COLUMN))
def test_dora_magnitude_follows_the_weight_rows_of_a_column_parallel_linear(kind: str) -> None:
    """A magnitude is one value per output row: rank t holds the magnitudes of the rows it holds."""
    base, rows = COLUMN[kind]
    modules = _hf(base, {})
    pairs = enumerate(zip(modules, rows, strict=True))
    magnitude = {m: torch.arange(n, dtype=torch.float64) + 100 * (i + 1) for i, (m, n) in pairs}
    weights = TensorSource({f"{m}.weight": magnitude[m][:, None].expand(-1, 2).contiguous() for m in modules})
    lm = LoRAWeight(base, "M")
    assert lm.partition_dim == 0
    source = TensorSource({f"{m}.lora_magnitude_vector": magnitude[m] for m in modules})
    shards = [lm.to_megatron(source, {}, Shard(t, TP)) for t in range(TP)]
    for t in range(TP):
        assert torch.equal(shards[t], base.to_megatron(weights, {}, Shard(t, TP))[:, 0])
    back = {p.name: p.tensor for p in lm.to_hf(shards, {})}
    assert set(back) == {f"{m}.lora_magnitude_vector" for m in modules}
    for m in modules:
        assert torch.equal(back[f"{m}.lora_magnitude_vector"], magnitude[m])


def test_dora_magnitude_of_a_row_parallel_linear_is_whole_on_every_rank() -> None:
    lm = LoRAWeight(RowParallel("l.proj.weight", "h.o.weight"), "M")
    magnitude = torch.arange(5, dtype=torch.float64)
    assert lm.partition_dim is None
    assert torch.equal(lm.to_megatron(TensorSource({"h.o.lora_magnitude_vector": magnitude}), {}, Shard()), magnitude)
    assert lm.megatron.text == "l.proj.adapter.weight_magnitude"
    assert [(p.name, p.tensor) for p in lm.to_hf([magnitude], {})] == [("h.o.lora_magnitude_vector", magnitude)]
