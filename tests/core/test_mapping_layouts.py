"""Each mapping type's Megatron layout pinned by an index map written from megatron-core's modules.

The property tests check export(import(x)) == x, which a bug made in both directions passes. Here
every HF row carries its own label and each TP rank's Megatron shard must list the labels in the
order megatron-core's module reads them:
- ``linear_qkv`` (``Attention.get_query_key_value_tensors``): the output viewed as
  [query groups, (heads per group [+ as many gate heads] + 2) x head_dim], split per group into q
  (then the gate, with ``attention_output_gate``), k, v; a column-parallel linear, so TP rank r
  holds groups [r·g/tp, (r+1)·g/tp). transformers' Qwen3.5 keeps each head's gate after its q rows
  inside ``q_proj`` ([q_h; gate_h] per head).
- ``linear_fc1`` with a gated unit (``MLP.forward``'s glu): rank r's output is chunked in two along
  the features, act(first) * second, so rank r holds [gate_r; up_r].
- a row-parallel linear splits the input features (dim 1); GDN ``in_proj`` is split per rank into
  [q, k, v, z, b, a] of that rank's heads (``GatedDeltaNet.forward``).
- stacked experts: expert e's param is slab e; a shifted norm is the HF value plus the shift.
"""

from __future__ import annotations

import torch

from bridgecore.mapping import (
    Broadcast,
    ColumnParallel,
    Concat,
    FusedQKV,
    GatedMLP,
    PackedGatedMLP,
    Replicated,
    RowParallel,
    Shard,
    Shifted,
    Stacked,
    TensorSource,
)

COLS = 3


def labelled(rows: int, base: int) -> torch.Tensor:
    """Rows labelled base, base+1, ...: every column of row i holds base + i."""
    return (torch.arange(rows, dtype=torch.float64) + base)[:, None].expand(rows, COLS).contiguous()


def labels(shard: torch.Tensor) -> list[int]:
    assert bool((shard == shard[:, :1]).all()), "a row mixes labels"
    return [int(v) for v in shard[:, 0].tolist()]


def shard_labels(mapping, tensors: dict[str, torch.Tensor], tp: int, captures: dict | None = None) -> list[list[int]]:
    source = TensorSource(tensors)
    return [labels(mapping.to_megatron(source, captures or {}, Shard(r, tp))) for r in range(tp)]


def test_fused_qkv_is_grouped_q_then_k_then_v_and_split_by_groups() -> None:
    heads, groups, d, tp = 8, 4, 2, 2
    per_group = heads // groups
    q, k, v = labelled(heads * d, 0), labelled(groups * d, 1000), labelled(groups * d, 2000)
    mapping = FusedQKV("qkv", "q", "k", "v", heads=heads, groups=groups, head_dim=d)
    expected = []
    for r in range(tp):
        rows = []
        for group in range(r * groups // tp, (r + 1) * groups // tp):
            rows += [(group * per_group + h) * d + t for h in range(per_group) for t in range(d)]  # its q heads
            rows += [1000 + group * d + t for t in range(d)]  # its k head
            rows += [2000 + group * d + t for t in range(d)]  # its v head
        expected.append(rows)
    assert shard_labels(mapping, {"q": q, "k": k, "v": v}, tp) == expected


def test_fused_qkv_with_the_gate_inside_q_proj() -> None:
    heads, groups, d, tp = 4, 2, 2, 2
    per_group = heads // groups
    q = labelled(2 * heads * d, 0)  # transformers' Qwen3.5: [q_h; gate_h] per head
    k, v = labelled(groups * d, 1000), labelled(groups * d, 2000)
    mapping = FusedQKV("qkv", "q", "k", "v", heads=heads, groups=groups, head_dim=d, gate="in_q")
    expected = []
    for r in range(tp):
        rows = []
        for group in range(r * groups // tp, (r + 1) * groups // tp):
            group_heads = range(group * per_group, (group + 1) * per_group)
            rows += [2 * h * d + t for h in group_heads for t in range(d)]  # q of each head
            rows += [2 * h * d + d + t for h in group_heads for t in range(d)]  # then each head's gate
            rows += [1000 + group * d + t for t in range(d)] + [2000 + group * d + t for t in range(d)]
        expected.append(rows)
    assert shard_labels(mapping, {"q": q, "k": k, "v": v}, tp) == expected


def test_fused_qkv_headwise_gate_repeats_each_heads_row() -> None:
    heads, groups, d = 4, 2, 3
    tensors = {
        "q": labelled(heads * d, 0),
        "k": labelled(groups * d, 1000),
        "v": labelled(groups * d, 2000),
        "g": labelled(heads, 3000),
    }
    mapping = FusedQKV("qkv", "q", "k", "v", heads=heads, groups=groups, head_dim=d, gate="headwise", g="g")
    (rows,) = shard_labels(mapping, tensors, 1)
    first_group = list(range(2 * d)) + [3000] * d + [3001] * d + [1000, 1001, 1002, 2000, 2001, 2002]
    assert rows[: len(first_group)] == first_group


def test_gated_fc1_rank_r_is_its_gate_rows_then_its_up_rows() -> None:
    inter, tp = 8, 4
    gate, up = labelled(inter, 0), labelled(inter, 100)
    chunk = inter // tp
    expected = [[r * chunk + i for i in range(chunk)] + [100 + r * chunk + i for i in range(chunk)] for r in range(tp)]
    assert shard_labels(GatedMLP("fc1", "gate", "up"), {"gate": gate, "up": up}, tp) == expected
    packed = torch.cat([gate, up])  # Qwen's packed gate_up_proj: [gate; up]
    assert shard_labels(PackedGatedMLP("fc1", "gate_up"), {"gate_up": packed}, tp) == expected


def test_column_parallel_splits_rows_and_row_parallel_splits_columns() -> None:
    weight = labelled(4, 0)
    assert shard_labels(ColumnParallel("w", "w"), {"w": weight}, 2) == [[0, 1], [2, 3]]
    columns = torch.arange(6, dtype=torch.float64).expand(2, 6).contiguous()
    shards = [RowParallel("w", "w").to_megatron(TensorSource({"w": columns}), {}, Shard(r, 2)) for r in range(2)]
    assert [s[0].tolist() for s in shards] == [[0, 1, 2], [3, 4, 5]]


def test_gdn_in_proj_rank_r_holds_its_share_of_each_component() -> None:
    nk, nv, dk, dv, tp = 2, 4, 2, 3, 2
    qkv = labelled(2 * nk * dk + nv * dv, 0)
    z, b, a = labelled(nv * dv, 1000), labelled(nv, 2000), labelled(nv, 3000)
    components = [
        (0, 0, nk * dk),
        (0, nk * dk, nk * dk),
        (0, 2 * nk * dk, nv * dv),
        (1, 0, nv * dv),
        (2, 0, nv),
        (3, 0, nv),
    ]
    mapping = Concat("in_proj", ["qkv", "z", "b", "a"], components)
    expected = []
    for r in range(tp):
        q_rows = [r * nk * dk // tp + i for i in range(nk * dk // tp)]
        k_rows = [nk * dk + r * nk * dk // tp + i for i in range(nk * dk // tp)]
        v_rows = [2 * nk * dk + r * nv * dv // tp + i for i in range(nv * dv // tp)]
        z_rows = [1000 + r * nv * dv // tp + i for i in range(nv * dv // tp)]
        b_rows = [2000 + r * nv // tp + i for i in range(nv // tp)]
        a_rows = [3000 + r * nv // tp + i for i in range(nv // tp)]
        expected.append(q_rows + k_rows + v_rows + z_rows + b_rows + a_rows)
    assert shard_labels(mapping, {"qkv": qkv, "z": z, "b": b, "a": a}, tp) == expected


def test_stacked_expert_e_is_slab_e_and_broadcast_copies_one_tensor() -> None:
    experts = 3
    stacked = torch.stack([labelled(2, 100 * e) for e in range(experts)])
    mapping = Stacked(ColumnParallel("experts.{expert}.w", "w"), experts)
    for e in range(experts):
        assert shard_labels(mapping, {"w": stacked}, 1, {"expert": e}) == [[100 * e, 100 * e + 1]]
    shared = Broadcast(Replicated("experts.{expert}.amax", "amax"))
    value = torch.tensor(0.5)
    for e in range(experts):
        assert torch.equal(shared.to_megatron(TensorSource({"amax": value}), {"expert": e}, Shard()), value)


def test_shifted_norm_is_the_hf_value_plus_the_shift() -> None:
    weight = torch.tensor([1.0, 1.5, 0.75, 2.0], dtype=torch.bfloat16)
    mapping = Shifted(Replicated("norm", "norm"), -1.0)
    got = mapping.to_megatron(TensorSource({"norm": weight}), {}, Shard())
    assert got.tolist() == [0.0, 0.5, -0.25, 1.0]
