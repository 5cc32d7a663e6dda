"""Patterns, the mapping table's binding and coverage, and the broadcast copies' export check: what
each one answers and every refusal with its whole message."""

from __future__ import annotations

import pytest
import torch

from bridgecore.errors import BridgeError
from bridgecore.mapping import Broadcast, ColumnParallel, Copies, HFPiece, MappingTable, Pattern, Replicated
from bridgecore.mapping.pattern import bucket


def refusal(error: type[Exception], call) -> str:
    with pytest.raises(error) as caught:
        call()
    return str(caught.value)


def test_pattern_refusals() -> None:
    assert (
        refusal(ValueError, lambda: Pattern("a.{layer}.b.{layer}")) == "pattern 'a.{layer}.b.{layer}' repeats a capture"
    )
    # str() of a KeyError is the repr of its message
    assert (
        refusal(KeyError, lambda: Pattern("a.{layer}.w").format({}))
        == "\"pattern 'a.{layer}.w' needs capture {layer}\""
    )
    message = refusal(ValueError, lambda: Pattern("a.{mtp+45}.w").match("a.1.w"))
    assert message == "pattern 'a.{mtp+45}.w': offsets belong on the HF side only"


def test_pattern_match_format_and_offsets() -> None:
    pattern = Pattern("l.{layer}.e.{expert}.w")
    assert pattern.fields == ("layer", "expert")
    assert pattern.match("l.3.e.17.w") == {"layer": 3, "expert": 17}
    assert pattern.match("l.3.e.17.w2") is None and pattern.match("l.3xe.17.w") is None
    assert pattern.format({"layer": 3, "expert": 17}) == "l.3.e.17.w"
    assert Pattern("m.{mtp+45}.w").format({"mtp": 2}) == "m.47.w"
    assert Pattern("m.{mtp-1}.w").format({"mtp": 2}) == "m.1.w"


def test_partial_regex_fixes_the_given_captures_and_leaves_the_others_free() -> None:
    partial = Pattern("l.{layer}.e.{expert}.w").partial_regex({"layer": 3})
    assert partial.match("l.3.e.17.w") and partial.match("l.3.e.0.w")
    for other in ("l.4.e.1.w", "l.3.e.1.wx", "l.3.e.x.w", "l.3xe.1.w", "l.31.e.1.w"):
        assert not partial.match(other), other
    shifted = Pattern("m.{mtp+45}.e.{expert}.w").partial_regex({"mtp": 1, "expert": 2})
    assert shifted.match("m.46.e.2.w") and not shifted.match("m.1.e.2.w") and not shifted.match("m.46.e.3.w")


def test_a_bucket_is_the_last_component_with_digits_as_hashes() -> None:
    assert bucket("decoder.layers.3.mlp.experts.linear_fc1.weight17") == "weight#"
    assert bucket("a12b.c3d45") == "c#d#"
    assert bucket("weight7") == "weight#"
    assert Pattern("l.{layer}.experts.linear_fc1.weight{expert}").bucket == "weight#"


def test_the_table_binds_one_mapping_and_refuses_two() -> None:
    one = ColumnParallel("l.{layer}.w", "h.{layer}.w")
    table = MappingTable([one, Replicated("l.{layer}.n", "h.{layer}.n")])
    binding = table.find("l.2.w")
    assert (binding.megatron, binding.mapping, binding.captures, binding.hf) == (
        "l.2.w",
        one,
        (("layer", 2),),
        ["h.2.w"],
    )
    assert table.find("l.2.x") is None and table.find("other") is None
    both = MappingTable([one, Replicated("l.{x}.w", "h.w")])
    assert refusal(BridgeError, lambda: both.find("l.2.w")) == (
        "Megatron param l.2.w matches 2 mappings:"
        " ColumnParallel(l.{layer}.w <- h.{layer}.w), Replicated(l.{x}.w <- h.w)"
    )


def test_coverage_lists_every_offender_and_records_what_was_waived() -> None:
    table = MappingTable([Replicated("l.{layer}.w", "h.{layer}.w")])
    unmapped = [f"u.{i}" for i in range(10)]
    message = refusal(BridgeError, lambda: table.cover(["l.0.w", *unmapped], None))
    assert message == (
        "10 Megatron params have no mapping: u.0, u.1, u.2, u.3, u.4, u.5, u.6, u.7 and 2 more"
        " (waive with --allow-unmapped PATTERN)"
    )
    message = refusal(BridgeError, lambda: table.cover(["l.0.w", *unmapped[:8]], None))
    assert message.startswith("8 Megatron params have no mapping: u.0,") and message.endswith(
        "u.7 (waive with --allow-unmapped PATTERN)"
    )
    coverage = table.cover(["l.0.w", "u.0", "u.1"], None, allow_unmapped=["u.*"])
    assert [b.megatron for b in coverage.bindings] == ["l.0.w"]
    assert (coverage.waived_hf, coverage.waived_megatron) == ([], ["u.0", "u.1"])
    message = refusal(BridgeError, lambda: table.cover(["l.0.w", "l.1.w"], ["h.0.w"]))
    assert message == "checkpoint lacks 1 tensors the mappings need: h.1.w"
    message = refusal(BridgeError, lambda: table.cover(["l.0.w"], ["h.0.w", "x.b", "x.a"]))
    assert message == "2 checkpoint tensors are not mapped: x.a, x.b (waive with --allow-unmapped PATTERN)"
    coverage = table.cover(["l.0.w"], ["h.0.w", "x.b", "x.a"], allow_unmapped=["x.*"])
    assert ([b.megatron for b in coverage.bindings], coverage.waived_hf, coverage.waived_megatron) == (
        ["l.0.w"],
        ["x.a", "x.b"],
        [],
    )


def test_broadcast_refusals_and_copies() -> None:
    inner = Replicated("l.{layer}.e.{expert}.amax", "h.{layer}.amax")
    message = refusal(ValueError, lambda: Broadcast(Replicated("l.{layer}.amax", "h.{layer}.amax")))
    assert (
        message
        == "Replicated(l.{layer}.amax <- h.{layer}.amax): a broadcast over {expert} needs it in the Megatron pattern"
    )
    message = refusal(ValueError, lambda: Broadcast(Replicated("l.{expert}.amax", "h.{expert}.amax")))
    assert message == (
        "Replicated(l.{expert}.amax <- h.{expert}.amax):"
        " the HF tensors of a broadcast over {expert} carry no {expert} capture"
    )
    broadcast = Broadcast(inner)
    assert repr(broadcast) == "Broadcast[expert](Replicated(l.{layer}.e.{expert}.amax <- h.{layer}.amax))"
    (piece,) = broadcast.to_hf([torch.tensor([2.0])], {"layer": 1, "expert": 3})
    assert (piece.name, piece.copy) == ("h.1.amax", ("expert", 3))


def test_copies_keep_copy_0_and_refuse_diverged_copies_over_every_rank() -> None:
    value, other = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0])
    rank0, rank1 = Copies(), Copies()
    assert rank0.keep(HFPiece("plain", value))
    assert rank0.keep(HFPiece("h.amax", value, copy=("expert", 0)))
    assert not rank0.keep(HFPiece("h.amax", value, copy=("expert", 1)))
    assert not rank1.keep(HFPiece("h.amax", value, copy=("expert", 2)))
    assert not rank1.keep(HFPiece("h.amax", other, copy=("expert", 3)))
    # a slab of a stacked tensor is its own item
    assert not rank1.keep(HFPiece("s.amax", value, expert=1, num_experts=2, copy=("layer", 5)))
    assert rank1.keep(HFPiece("s.amax", other, expert=1, num_experts=2, copy=("layer", 0)))
    assert set(rank0.digests) == {"h.amax"} and set(rank1.digests) == {"h.amax", "s.amax[1]"}
    Copies.check([rank0.digests])
    assert refusal(BridgeError, lambda: Copies.check([rank0.digests, rank1.digests])) == (
        "h.amax: the HF checkpoint holds one tensor for the Megatron params of every expert, but those of"
        " expert 3 differ from expert 0's; it cannot be exported as one tensor"
    )
    rank1.digests.pop("h.amax")
    assert refusal(BridgeError, lambda: Copies.check([rank0.digests, rank1.digests])) == (
        "s.amax[1]: the HF checkpoint holds one tensor for the Megatron params of every layer, but those of"
        " layer 5 differ from layer 0's; it cannot be exported as one tensor"
    )
    # the same values in another dtype or shape are not the same tensor
    for changed in (value.double(), value.reshape(2, 1)):
        copies = Copies()
        copies.keep(HFPiece("h.amax", value, copy=("expert", 0)))
        copies.keep(HFPiece("h.amax", changed, copy=("expert", 1)))
        with pytest.raises(BridgeError, match="expert 1 differ from expert 0's"):
            Copies.check([copies.digests])


def test_notes_are_said_once_with_every_item_over_every_rank() -> None:
    rank0, rank1 = Copies(), Copies()
    for i in range(3):
        rank0.keep(HFPiece(f"a{i}", torch.zeros(1), note=("stale parts", f"a{i}")))
    for i in range(3, 6):
        rank1.keep(HFPiece(f"a{i}", torch.zeros(1), note=("stale parts", f"a{i}")))
    rank1.keep(HFPiece("b", torch.zeros(1), note=("no parts", "b")))
    rank1.keep(HFPiece("b", torch.zeros(1), note=("no parts", "b")))
    assert rank0.notes == {"stale parts": {"a0", "a1", "a2"}}
    assert Copies.said([rank0.notes, rank1.notes]) == ["no parts: b", "stale parts: a0, a1, a2, a3 and 2 more"]
    assert Copies.said([rank0.notes], shown=3) == ["stale parts: a0, a1, a2"]
    assert Copies.said([]) == []
