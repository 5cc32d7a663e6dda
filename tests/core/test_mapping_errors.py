"""Every refusal of the mapping types, with its whole message, and what import reads.

A wrong layout must fail with a line that names the tensor and the sizes involved, so each message is
compared whole: a message that lost its tensor name or printed the wrong size is a defect here.
Import reads one slice per contiguous run of HF rows: the read counts pin that too.
"""

from __future__ import annotations

import pytest
import torch

from bridgecore.errors import BridgeError
from bridgecore.mapping import (
    Broadcast,
    ColumnParallel,
    Concat,
    FusedQKV,
    GatedMLP,
    HFPiece,
    PackedGatedMLP,
    RowParallel,
    Segment,
    Segmented,
    Shard,
    Shifted,
    Stacked,
    TensorSource,
)
from bridgecore.mapping.types import Wrapper

#: TP1: the one rank holds the whole param
WHOLE = Shard()


def rows(n: int, cols: int = 2) -> torch.Tensor:
    return torch.arange(n * cols, dtype=torch.float32).reshape(n, cols)


def refusal(error: type[Exception], call) -> str:
    with pytest.raises(error) as caught:
        call()
    return str(caught.value)


def imported(mapping, tensors: dict[str, torch.Tensor], shard: Shard = WHOLE, captures: dict | None = None):
    return mapping.to_megatron(TensorSource(tensors), captures or {}, shard)


def test_hf_captures_must_come_from_the_megatron_pattern() -> None:
    message = refusal(ValueError, lambda: ColumnParallel("a.{layer}.w", "b.{expert}.w"))
    assert (
        message == "ColumnParallel(a.{layer}.w <- b.{expert}.w): HF captures ['expert'] are not in the Megatron pattern"
    )


def test_rows_that_do_not_split_over_tp_name_the_tensor_and_the_dim() -> None:
    message = refusal(BridgeError, lambda: imported(ColumnParallel("w", "h"), {"h": rows(5)}, Shard(0, 2)))
    assert message == "h: 5 rows along dim 0 do not split over TP=2"
    message = refusal(BridgeError, lambda: imported(RowParallel("w", "h"), {"h": rows(3, 5)}, Shard(1, 2)))
    assert message == "h: 5 rows along dim 1 do not split over TP=2"
    # export: 3 query groups of one row each do not split over 2 ranks
    qkv = FusedQKV("qkv", "q", "k", "v", heads=3, groups=3, head_dim=1)
    message = refusal(BridgeError, lambda: qkv.to_hf([rows(5), rows(4)], {}))
    assert message == "qkv: 9 rows along dim 0 do not split over TP=2"


def test_gated_mlp_refusals() -> None:
    fc1 = GatedMLP("fc1", "gate", "up")
    assert refusal(BridgeError, lambda: fc1.to_hf([rows(5)], {})) == "fc1: size 5 does not divide by 2"
    message = refusal(BridgeError, lambda: imported(fc1, {"gate": rows(4), "up": rows(2)}))
    assert message == "GatedMLP(fc1 <- gate, up): gate has 4 rows but up has 2"
    message = refusal(BridgeError, lambda: imported(fc1, {"gate": rows(3), "up": rows(3)}, Shard(0, 2)))
    assert message == "GatedMLP(fc1 <- gate, up) over TP: size 3 does not divide by 2"
    packed = PackedGatedMLP("fc1", "gate_up")
    message = refusal(BridgeError, lambda: imported(packed, {"gate_up": rows(5)}))
    assert message == "PackedGatedMLP(fc1 <- gate_up): size 5 does not divide by 2"
    message = refusal(BridgeError, lambda: imported(packed, {"gate_up": rows(6)}, Shard(0, 2)))
    assert message == "PackedGatedMLP(fc1 <- gate_up) over TP: size 3 does not divide by 2"


def test_concat_refusals() -> None:
    two = Concat("w", ["a", "b"], [(0, 0, 2), (1, 0, 2)])
    message = refusal(BridgeError, lambda: imported(two, {"a": rows(2), "b": rows(3)}))
    assert message == "Concat(w <- a, b): HF sizes along dim 0 are [2, 3], expected [2, 2]"
    assert refusal(BridgeError, lambda: two.to_hf([rows(5)], {})) == "Concat(w <- a, b): Megatron size 5, expected 4"
    odd = Concat("w", ["a"], [(0, 0, 3)])
    message = refusal(BridgeError, lambda: imported(odd, {"a": rows(3)}, Shard(0, 2)))
    assert message == "Concat(w <- a) component at 0 over TP: size 3 does not divide by 2"
    # components that leave rows of their source uncovered cannot be written back
    gap = Concat("w", ["a"], [(0, 0, 2), (0, 4, 2)])
    assert refusal(BridgeError, lambda: gap.to_hf([rows(4)], {})) == "a: layout leaves rows [2, 4) unfilled along dim 0"


def test_fused_qkv_refusals() -> None:
    def qkv(**kw) -> FusedQKV:
        return FusedQKV("qkv", "q", "k", "v", **{"heads": 2, "groups": 1, "head_dim": 2, **kw})

    assert refusal(ValueError, lambda: qkv(gate="inside")) == "unknown gate form 'inside'"
    needs_g = "a separate or head-wise gate needs its HF tensor `g`, and only those do"
    assert refusal(ValueError, lambda: qkv(gate="separate")) == needs_g
    assert refusal(ValueError, lambda: qkv(gate="headwise")) == needs_g
    assert refusal(ValueError, lambda: qkv(g="g")) == needs_g
    assert refusal(ValueError, lambda: qkv(gate="in_q", g="g")) == needs_g
    assert refusal(BridgeError, lambda: qkv(heads=5, groups=2)) == "qkv: 5 heads do not divide into 2 query groups"
    message = refusal(BridgeError, lambda: imported(qkv(), {"q": rows(3), "k": rows(2), "v": rows(2)}))
    assert (
        message == "FusedQKV(qkv <- q, k, v): HF rows [3, 2, 2], expected [4, 2, 2] for 2 heads, 1 groups, head dim 2"
    )
    message = refusal(BridgeError, lambda: qkv().to_hf([rows(7)], {}))
    assert message == "FusedQKV(qkv <- q, k, v): Megatron has 7 rows, expected 8"
    # a gate doubles the q rows in Megatron: q, gate, k, v
    headwise = qkv(gate="headwise", g="g")
    message = refusal(BridgeError, lambda: imported(headwise, {"q": rows(4), "k": rows(2), "v": rows(2), "g": rows(4)}))
    assert message == (
        "FusedQKV(qkv <- q, k, v, g): HF rows [4, 2, 2, 4], expected [4, 2, 2, 2] for 2 heads, 1 groups, head dim 2"
    )
    assert refusal(BridgeError, lambda: headwise.to_hf([rows(8)], {})) == (
        "FusedQKV(qkv <- q, k, v, g): Megatron has 8 rows, expected 12"
    )
    separate = qkv(gate="separate", g="g")
    message = refusal(BridgeError, lambda: imported(separate, {"q": rows(4), "k": rows(2), "v": rows(2), "g": rows(2)}))
    assert message == (
        "FusedQKV(qkv <- q, k, v, g): HF rows [4, 2, 2, 2], expected [4, 2, 2, 4] for 2 heads, 1 groups, head dim 2"
    )
    in_q = qkv(gate="in_q")
    message = refusal(BridgeError, lambda: imported(in_q, {"q": rows(4), "k": rows(2), "v": rows(2)}))
    assert (
        message == "FusedQKV(qkv <- q, k, v): HF rows [4, 2, 2], expected [8, 2, 2] for 2 heads, 1 groups, head dim 2"
    )


def test_a_headwise_gate_whose_expanded_rows_diverged_names_the_gate() -> None:
    mapping = FusedQKV("qkv", "q", "k", "v", heads=2, groups=1, head_dim=2, gate="headwise", g="g")
    megatron = rows(12)  # [q: 4 rows, gate: 2 rows per head, k: 2, v: 2]
    megatron[4:8] = torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0], [3.0, 4.0]])
    assert torch.equal(mapping.to_hf([megatron], {})[3].tensor, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    megatron[7, 0] = 5.0
    assert refusal(BridgeError, lambda: mapping.to_hf([megatron], {})) == (
        "g: the 2 Megatron rows that expand each HF row are no longer equal; the HF layout cannot represent this tensor"
    )


def test_fused_qkv_with_a_separate_gate_puts_each_groups_gate_after_its_q() -> None:
    heads, groups, d, tp = 4, 2, 1, 2
    tensors = {"q": rows(heads * d, 1), "k": rows(groups * d, 1) + 100, "v": rows(groups * d, 1) + 200}
    tensors["g"] = rows(heads * d, 1) + 300
    mapping = FusedQKV("qkv", "q", "k", "v", heads=heads, groups=groups, head_dim=d, gate="separate", g="g")
    shards = [imported(mapping, tensors, Shard(r, tp)) for r in range(tp)]
    # group j (on rank j): its q heads 2j, 2j+1, then their gate rows, then its k and v
    assert [s[:, 0].tolist() for s in shards] == [[0, 1, 300, 301, 100, 200], [2, 3, 302, 303, 101, 201]]
    pieces = mapping.to_hf(shards, {})
    assert [p.name for p in pieces] == ["q", "k", "v", "g"]
    assert all(torch.equal(p.tensor, tensors[p.name]) for p in pieces)


class RowsOfColumns(Concat):
    """A Concat along the input features: the dim is the subclass's to choose."""

    dim = 1


def test_a_layout_along_dim_1_cuts_and_joins_along_dim_1() -> None:
    mapping = RowsOfColumns("w", ["a", "b"], [(0, 0, 2), (1, 0, 2)])
    a, b = rows(3, 2), rows(3, 2) + 100
    shards = [imported(mapping, {"a": a, "b": b}, Shard(r, 2)) for r in range(2)]
    assert [s.tolist() for s in shards] == [
        torch.cat([a[:, :1], b[:, :1]], 1).tolist(),
        torch.cat([a[:, 1:], b[:, 1:]], 1).tolist(),
    ]
    pieces = mapping.to_hf(shards, {})
    assert torch.equal(pieces[0].tensor, a) and torch.equal(pieces[1].tensor, b)


class TwoRepeatedRuns(Segmented):
    """Two neighbouring runs of the same rows repeated: import reads them as one."""

    def layout(self, tp: int, sizes: list[int]) -> list[Segment]:
        return [Segment(0, 0, 1, repeat=2), Segment(0, 1, 1, repeat=2)]


def test_import_reads_one_slice_per_contiguous_run() -> None:
    def reads(mapping, tensors: dict[str, torch.Tensor], shard: Shard = WHOLE) -> int:
        source = TensorSource(tensors)
        mapping.to_megatron(source, {}, shard)
        return source.reads

    assert reads(ColumnParallel("w", "h"), {"h": rows(4)}) == 1
    # gate then up: two runs at TP1; at TP2 each rank reads its own two and touches no other
    fc1 = {"gate": rows(4), "up": rows(4)}
    assert reads(GatedMLP("fc1", "gate", "up"), fc1) == 2
    assert reads(GatedMLP("fc1", "gate", "up"), fc1, Shard(0, 2)) == 2
    assert reads(GatedMLP("fc1", "gate", "up"), fc1, Shard(1, 2)) == 2
    # packed [gate; up] at TP1 is one run
    assert reads(PackedGatedMLP("fc1", "gate_up"), {"gate_up": rows(4)}) == 1
    assert reads(Concat("w", ["a"], [(0, 0, 2), (0, 2, 2)]), {"a": rows(4)}) == 1
    repeated = TwoRepeatedRuns("w", "h")
    assert reads(repeated, {"h": rows(2)}) == 1
    assert imported(repeated, {"h": rows(2)})[:, 0].tolist() == [0, 0, 2, 2]


def test_stacked_refusals() -> None:
    expert = ColumnParallel("e.{expert}.w", "h")
    stacked = Stacked(expert, num_experts=4)
    assert repr(stacked) == "Stacked[4](ColumnParallel(e.{expert}.w <- h))"
    message = refusal(ValueError, lambda: Stacked(ColumnParallel("w", "h"), 4))
    assert message == "ColumnParallel(w <- h): a stacked mapping needs {expert} in the Megatron pattern"
    message = refusal(ValueError, lambda: Stacked(ColumnParallel("e.{expert}.w", "h.{expert}"), 4))
    assert message == "ColumnParallel(e.{expert}.w <- h.{expert}): stacked HF tensors carry no {expert} capture"
    tensors = {"h": torch.arange(4 * 2 * 2.0).reshape(4, 2, 2)}
    assert torch.equal(imported(stacked, tensors, captures={"expert": 3}), tensors["h"][3])
    for outside in (-1, 4):
        message = refusal(BridgeError, lambda e=outside: imported(stacked, tensors, captures={"expert": e}))
        assert message == f"e.{outside}.w: expert {outside} is outside the 4 experts of the config"
    message = refusal(BridgeError, lambda: imported(stacked, {"h": rows(3)}, captures={"expert": 0}))
    assert message == "h: stacked expert tensor has shape [3, 2], expected 4 experts along dim 0 as the config says"
    piece = stacked.to_hf([tensors["h"][3]], {"expert": 3})[0]
    assert (piece.name, piece.expert, piece.num_experts, piece.full_shape) == ("h", 3, 4, (4, 2, 2))


class _Negated(Wrapper):
    """A wrapper that changes import only: everything else passes through to the inner mapping."""

    def to_megatron(self, source, captures, shard):
        return -self.inner.to_megatron(source, captures, shard)


class _Needy(ColumnParallel):
    def needs(self, captures: dict[str, int]) -> list[str]:
        return [f"other.{captures['layer']}"]

    def to_hf(self, shards, captures, given):
        return [HFPiece(self.hf_names(captures)[0], torch.cat(shards) + given[0])]


def test_a_wrapper_passes_through_what_its_subclass_does_not_change() -> None:
    inner = _Needy("l.{layer}.w", "h.{layer}.w", layers=[1])
    wrapped = _Negated(inner)
    assert (wrapped.megatron, wrapped.hf, wrapped.layers, wrapped.partition_dim) == (
        inner.megatron,
        inner.hf,
        inner.layers,
        0,
    )
    assert wrapped.match("l.1.w") == {"layer": 1} and wrapped.match("l.2.w") is None
    assert wrapped.needs({"layer": 1}) == ["other.1"]
    assert torch.equal(imported(wrapped, {"h.1.w": rows(2)}, captures={"layer": 1}), -rows(2))
    (piece,) = wrapped.to_hf([rows(1), rows(1)], {"layer": 1}, torch.ones(1, 2))
    assert piece.name == "h.1.w" and torch.equal(piece.tensor, torch.cat([rows(1), rows(1)]) + 1)


def test_the_core_wrappers_hand_what_export_needs_to_their_inner_mapping() -> None:
    given = torch.ones(1, 2)
    shifted = Shifted(_Needy("l.{layer}.w", "h.{layer}.w"), 1.0)
    (piece,) = shifted.to_hf([rows(1)], {"layer": 0}, given)
    assert torch.equal(piece.tensor, rows(1) - 1 + 1)
    broadcast = Broadcast(_Needy("l.{layer}.e.{expert}.w", "h.{layer}.w"))
    (piece,) = broadcast.to_hf([rows(1)], {"layer": 0, "expert": 2}, given)
    assert torch.equal(piece.tensor, rows(1) + 1) and piece.copy == ("expert", 2)
    stacked = Stacked(_Needy("l.{layer}.e.{expert}.w", "h.{layer}.w"), 4)
    (piece,) = stacked.to_hf([rows(1)], {"layer": 0, "expert": 2}, given)
    assert torch.equal(piece.tensor, rows(1) + 1) and (piece.expert, piece.num_experts) == (2, 4)
