"""The mapping types: how one Megatron parameter is made from HF tensors, and back.

Every partitioned type is described by one primitive, a *layout*: the Megatron tensor, as the
concatenation of its TP shards, is an ordered list of row segments of the HF tensors along one dim.
From the layout follow, with no per-type code:
- import for TP rank r: the rows [r·N/t, (r+1)·N/t) of the layout, read from the HF files slice by
  slice (only those bytes);
- export: concatenate the gathered shards, cut them along the layout and put every segment back in
  its HF tensor, which is then exactly what import read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from bridgecore.errors import BridgeError
from bridgecore.mapping.pattern import Pattern


class Source(Protocol):
    """Where import reads HF tensors from: shapes without reading, and sliced reads."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, index: tuple[slice | int, ...]) -> torch.Tensor: ...


class TensorSource:
    """A :class:`Source` over tensors in memory, for tests of mappings (the core's and plugins').

    Reads return copies, as reads from a file do; ``reads`` counts them and ``elements_read`` what
    they returned.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.reads = 0
        self.elements_read = 0

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, index: tuple[slice | int, ...]) -> torch.Tensor:
        out = self.tensors[name][index].clone()
        self.reads += 1
        self.elements_read += out.numel()
        return out


@dataclass(frozen=True)
class Shard:
    """Which part of a partitioned Megatron param this rank holds: rank `rank` of `size`."""

    rank: int = 0
    size: int = 1


@dataclass(frozen=True)
class Segment:
    """Rows [start, start+length) of HF source `source` along the mapping's dim, each row repeated."""

    source: int
    start: int
    length: int
    repeat: int = 1

    @property
    def rows(self) -> int:
        return self.length * self.repeat


@dataclass
class HFPiece:
    """An exported HF tensor, or the slab `[expert]` of a stacked tensor of `num_experts` slabs.

    `copy` is set when several Megatron params hold the tensor (a
    :class:`~bridgecore.mapping.broadcast.Broadcast` mapping): (capture, value) of this copy; the copy
    with value 0 is written, every copy must equal it.
    `note` is (what happened, to which item) when the mapping decided something the user should read;
    the export says each distinct "what happened" once, with every item it happened to.
    """

    name: str
    tensor: torch.Tensor
    expert: int | None = None
    num_experts: int | None = None
    copy: tuple[str, int] | None = None
    note: tuple[str, str] | None = None

    @property
    def full_shape(self) -> tuple[int, ...]:
        if self.expert is None:
            return tuple(self.tensor.shape)
        return (self.num_experts, *self.tensor.shape)


class Mapping:
    """One Megatron param pattern related to one or more HF tensor patterns.

    `layers`, when given, restricts the `{layer}` capture (per-layer shapes differ in hybrid models).
    `partition_dim` is the dim Megatron splits this param over TP, or None when it is replicated.
    """

    partition_dim: int | None = None

    def __init__(self, megatron: str, hf: str | Sequence[str], *, layers: Sequence[int] | None = None):
        self.megatron = Pattern(megatron)
        self.hf = tuple(Pattern(h) for h in ([hf] if isinstance(hf, str) else hf))
        self.layers = None if layers is None else frozenset(layers)
        missing = {f for p in self.hf for f in p.fields} - set(self.megatron.fields)
        if missing:
            raise ValueError(f"{self}: HF captures {sorted(missing)} are not in the Megatron pattern")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.megatron.text} <- {', '.join(p.text for p in self.hf)})"

    @property
    def expert_capture(self) -> bool:
        return "expert" in self.megatron.fields

    def match(self, name: str) -> dict[str, int] | None:
        captures = self.megatron.match(name)
        if captures is None or (self.layers is not None and captures.get("layer") not in self.layers):
            return None
        return captures

    def hf_names(self, captures: dict[str, int]) -> list[str]:
        return [p.format(captures) for p in self.hf]

    def needs(self, captures: dict[str, int]) -> list[str]:
        """Other Megatron params (global names) whose values export needs beside this one's.

        Export passes them to :meth:`to_hf` as ``given``, whole (gathered like ``shards``) and in this
        order, or None for one the model does not have. Most mappings need none.
        """
        return []

    def to_megatron(self, source: Source, captures: dict[str, int], shard: Shard) -> torch.Tensor:
        """This rank's shard of the Megatron param, reading only the HF slices it needs."""
        raise NotImplementedError

    def to_hf(self, shards: list[torch.Tensor], captures: dict[str, int]) -> list[HFPiece]:
        """The HF tensors, from the param's shards of every TP rank in rank order.

        A mapping whose :meth:`needs` are not empty takes them as a third argument, ``given``."""
        raise NotImplementedError


class Replicated(Mapping):
    """The same tensor on every TP rank (norms, routers, biases of replicated modules)."""

    def to_megatron(self, source: Source, captures: dict[str, int], shard: Shard) -> torch.Tensor:
        return source.read(self.hf_names(captures)[0], ())

    def to_hf(self, shards: list[torch.Tensor], captures: dict[str, int]) -> list[HFPiece]:
        return [HFPiece(self.hf_names(captures)[0], shards[0])]


class Segmented(Mapping):
    """Base of every TP-partitioned type; subclasses only say what their layout is."""

    dim = 0

    @property
    def partition_dim(self) -> int:  # type: ignore[override]
        return self.dim

    def hf_sizes(self, sizes: list[int]) -> list[int]:
        """HF sizes along `dim`; import passes the checkpoint's, export passes [Megatron total]."""
        return sizes

    def layout(self, tp: int, sizes: list[int]) -> list[Segment]:
        raise NotImplementedError

    def _checked_layout(self, tp: int, sizes: list[int], where: str) -> list[Segment]:
        segments = _merge(self.layout(tp, sizes))
        total = sum(s.rows for s in segments)
        if total % tp:
            raise BridgeError(f"{where}: {total} rows along dim {self.dim} do not split over TP={tp}")
        return segments

    def to_megatron(self, source: Source, captures: dict[str, int], shard: Shard) -> torch.Tensor:
        names = self.hf_names(captures)
        sizes = [source.shape(n)[self.dim] for n in names]
        segments = self._checked_layout(shard.size, self.hf_sizes(sizes), names[0])
        per_rank = sum(s.rows for s in segments) // shard.size
        lo, hi = shard.rank * per_rank, (shard.rank + 1) * per_rank
        parts, pos = [], 0
        for seg in segments:
            a, b = max(lo, pos), min(hi, pos + seg.rows)
            if a < b:
                first, last = (a - pos) // seg.repeat, (b - pos - 1) // seg.repeat
                index = (slice(None),) * self.dim + (slice(seg.start + first, seg.start + last + 1),)
                rows = source.read(names[seg.source], index)
                if seg.repeat > 1:
                    skip = (a - pos) - first * seg.repeat
                    rows = rows.repeat_interleave(seg.repeat, dim=self.dim).narrow(self.dim, skip, b - a)
                parts.append(rows)
            pos += seg.rows
        # torch.cat copies even a single part; one contiguous run is the read slice itself.
        return torch.cat(parts, dim=self.dim) if len(parts) > 1 else parts[0]

    def to_hf(self, shards: list[torch.Tensor], captures: dict[str, int]) -> list[HFPiece]:
        names = self.hf_names(captures)
        full = torch.cat(shards, dim=self.dim) if len(shards) > 1 else shards[0]
        segments = self._checked_layout(len(shards), self.hf_sizes([full.shape[self.dim]]), self.megatron.text)
        pieces: dict[int, list[tuple[int, torch.Tensor]]] = {i: [] for i in range(len(names))}
        pos = 0
        for seg in segments:
            rows = full.narrow(self.dim, pos, seg.rows)
            if seg.repeat > 1:
                rows = _collapse_repeats(rows, self.dim, seg.repeat, names[seg.source])
            pieces[seg.source].append((seg.start, rows))
            pos += seg.rows
        return [HFPiece(names[i], _assemble(pieces[i], self.dim, names[i])) for i in range(len(names))]


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbours that continue each other, so import issues one read per contiguous run."""
    out: list[Segment] = []
    for seg in segments:
        prev = out[-1] if out else None
        if (
            prev is not None
            and prev.source == seg.source
            and prev.repeat == seg.repeat
            and prev.start + prev.length == seg.start
        ):
            out[-1] = Segment(seg.source, prev.start, prev.length + seg.length, seg.repeat)
        else:
            out.append(seg)
    return out


def _collapse_repeats(rows: torch.Tensor, dim: int, repeat: int, name: str) -> torch.Tensor:
    moved = rows.movedim(dim, 0)
    grouped = moved.reshape(moved.shape[0] // repeat, repeat, *moved.shape[1:])
    first = grouped[:, 0]
    if not rows.is_meta and not torch.equal(grouped, first.unsqueeze(1).expand_as(grouped)):
        raise BridgeError(
            f"{name}: the {repeat} Megatron rows that expand each HF row are no longer equal;"
            " the HF layout cannot represent this tensor"
        )
    return first.movedim(0, dim)


def _assemble(parts: list[tuple[int, torch.Tensor]], dim: int, name: str) -> torch.Tensor:
    parts.sort(key=lambda p: p[0])
    expected = 0
    for start, rows in parts:
        if start != expected:
            raise BridgeError(f"{name}: layout leaves rows [{expected}, {start}) unfilled along dim {dim}")
        expected += rows.shape[dim]
    return torch.cat([rows for _, rows in parts], dim=dim) if len(parts) > 1 else parts[0][1]


def _split(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise BridgeError(f"{what}: size {total} does not divide by {parts}")
    return total // parts


class ColumnParallel(Segmented):
    """Split along dim 0 (output features): linear_qkv without fusion, linear_fc1, embeddings."""

    def layout(self, tp: int, sizes: list[int]) -> list[Segment]:
        return [Segment(0, 0, sizes[0])]


class RowParallel(ColumnParallel):
    """Split along dim 1 (input features): linear_proj, linear_fc2."""

    dim = 1


class GatedMLP(Segmented):
    """HF gate and up ↔ Megatron fc1, whose TP shard r is [gate_r; up_r]."""

    def __init__(self, megatron: str, gate: str, up: str, **kw):
        super().__init__(megatron, [gate, up], **kw)

    def hf_sizes(self, sizes: list[int]) -> list[int]:
        return sizes if len(sizes) == 2 else [_split(sizes[0], 2, self.megatron.text)] * 2

    def layout(self, tp: int, sizes: list[int]) -> list[Segment]:
        if sizes[0] != sizes[1]:
            raise BridgeError(f"{self}: gate has {sizes[0]} rows but up has {sizes[1]}")
        chunk = _split(sizes[0], tp, f"{self} over TP")
        return [Segment(i, r * chunk, chunk) for r in range(tp) for i in (0, 1)]


class PackedGatedMLP(Segmented):
    """One HF tensor holding [gate; up] along dim 0 (Qwen packed `gate_up_proj`) ↔ Megatron fc1."""

    def layout(self, tp: int, sizes: list[int]) -> list[Segment]:
        half = _split(sizes[0], 2, str(self))
        chunk = _split(half, tp, f"{self} over TP")
        return [Segment(0, h * half + r * chunk, chunk) for r in range(tp) for h in (0, 1)]


class Concat(Segmented):
    """Several HF row ranges, each split over TP on its own, concatenated per rank.

    `components` are (source, start, length) in Megatron order; each source's components must tile
    it. GDN `in_proj` ([q, k, v, z, b, a] per rank) and `conv1d` ([q, k, v] per rank) are this type.
    """

    def __init__(self, megatron: str, hf: Sequence[str], components: Sequence[tuple[int, int, int]], **kw):
        super().__init__(megatron, hf, **kw)
        self.components = [tuple(c) for c in components]

    def hf_sizes(self, sizes: list[int]) -> list[int]:
        expected = [sum(length for src, _, length in self.components if src == i) for i in range(len(self.hf))]
        if len(sizes) == len(expected) and sizes != expected:
            raise BridgeError(f"{self}: HF sizes along dim {self.dim} are {sizes}, expected {expected}")
        if len(sizes) == 1 and len(expected) > 1 and sizes[0] != sum(expected):
            raise BridgeError(f"{self}: Megatron size {sizes[0]}, expected {sum(expected)}")
        return expected

    def layout(self, tp: int, sizes: list[int]) -> list[Segment]:
        segments = []
        for r in range(tp):
            for src, start, length in self.components:
                chunk = _split(length, tp, f"{self} component at {start} over TP")
                segments.append(Segment(src, start + r * chunk, chunk))
        return segments


class FusedQKV(Segmented):
    """HF q, k, v (and an output gate) ↔ Megatron `linear_qkv`, grouped per query group.

    Megatron keeps, for each query group: its q heads, then (with `attention_output_gate`) the gate
    of those heads, then k, then v. The gate comes in one of three HF forms:
    - `gate="in_q"`: inside q_proj, per head [q_h (d rows), gate_h (d rows)] (Qwen3.5);
    - `gate="separate"`: its own tensor of heads·d rows;
    - `gate="headwise"`: its own tensor of one row per head (Step-3.5 `g_proj`), each row expanded to
      the head's d rows in Megatron; export takes it back only if the d rows are still equal.
    """

    def __init__(
        self,
        megatron: str,
        q: str,
        k: str,
        v: str,
        *,
        heads: int,
        groups: int,
        head_dim: int,
        gate: str | None = None,
        g: str | None = None,
        **kw,
    ):
        if gate not in (None, "in_q", "separate", "headwise"):
            raise ValueError(f"unknown gate form {gate!r}")
        if (gate in ("separate", "headwise")) != (g is not None):
            raise ValueError("a separate or head-wise gate needs its HF tensor `g`, and only those do")
        if heads % groups:
            raise BridgeError(f"{megatron}: {heads} heads do not divide into {groups} query groups")
        super().__init__(megatron, [q, k, v] + ([g] if g else []), **kw)
        self.heads, self.groups, self.head_dim, self.gate = heads, groups, head_dim, gate

    def hf_sizes(self, sizes: list[int]) -> list[int]:
        d, h, g = self.head_dim, self.heads, self.groups
        expected = [h * d * (2 if self.gate == "in_q" else 1), g * d, g * d]
        if self.gate == "separate":
            expected.append(h * d)
        elif self.gate == "headwise":
            expected.append(h)
        if len(sizes) == len(expected) and sizes != expected:
            raise BridgeError(f"{self}: HF rows {sizes}, expected {expected} for {h} heads, {g} groups, head dim {d}")
        megatron_rows = (2 * h + 2 * g) * d if self.gate else (h + 2 * g) * d
        if len(sizes) == 1 and sizes[0] != megatron_rows:
            raise BridgeError(f"{self}: Megatron has {sizes[0]} rows, expected {megatron_rows}")
        return expected

    def layout(self, tp: int, sizes: list[int]) -> list[Segment]:
        d, per_group = self.head_dim, self.heads // self.groups
        segments = []
        for j in range(self.groups):
            heads = range(j * per_group, (j + 1) * per_group)
            if self.gate == "in_q":
                segments += [Segment(0, 2 * h * d, d) for h in heads]
                segments += [Segment(0, 2 * h * d + d, d) for h in heads]
            else:
                segments.append(Segment(0, heads[0] * d, per_group * d))
                if self.gate == "separate":
                    segments.append(Segment(3, heads[0] * d, per_group * d))
                elif self.gate == "headwise":
                    segments.append(Segment(3, heads[0], per_group, repeat=d))
            segments += [Segment(1, j * d, d), Segment(2, j * d, d)]
        return segments


class Wrapper(Mapping):
    """A mapping around another one (``inner``): its patterns, layers and TP split, and by default its
    conversions; a subclass changes what passes through."""

    def __init__(self, inner: Mapping):
        self.inner = inner
        self.megatron, self.hf, self.layers = inner.megatron, inner.hf, inner.layers

    @property
    def partition_dim(self) -> int | None:  # type: ignore[override]
        return self.inner.partition_dim

    def needs(self, captures: dict[str, int]) -> list[str]:
        return self.inner.needs(captures)

    def to_megatron(self, source: Source, captures: dict[str, int], shard: Shard) -> torch.Tensor:
        return self.inner.to_megatron(source, captures, shard)

    def to_hf(self, shards: list[torch.Tensor], captures: dict[str, int], *given: Any) -> list[HFPiece]:
        return self.inner.to_hf(shards, captures, *given)


class Stacked(Wrapper):
    """Per-expert Megatron params ↔ HF tensors stacked over experts along dim 0 (`[E, ...]`).

    Wraps the per-expert mapping (`inner`): its Megatron pattern carries `{expert}`, its HF patterns do
    not; the expert capture selects the slab, so import reads one expert's slice and export writes one
    slab of the stacked tensor at its place.
    """

    def __init__(self, inner: Mapping, num_experts: int):
        if "expert" not in inner.megatron.fields:
            raise ValueError(f"{inner}: a stacked mapping needs {{expert}} in the Megatron pattern")
        if any("expert" in p.fields for p in inner.hf):
            raise ValueError(f"{inner}: stacked HF tensors carry no {{expert}} capture")
        super().__init__(inner)
        self.num_experts = num_experts

    def __repr__(self) -> str:
        return f"Stacked[{self.num_experts}]({self.inner!r})"

    def _expert(self, captures: dict[str, int]) -> int:
        expert = captures["expert"]
        if not 0 <= expert < self.num_experts:
            raise BridgeError(
                f"{self.megatron.format(captures)}: expert {expert} is outside the {self.num_experts}"
                " experts of the config"
            )
        return expert

    def to_megatron(self, source: Source, captures: dict[str, int], shard: Shard) -> torch.Tensor:
        slab = _ExpertSlab(source, self._expert(captures), self.num_experts)
        return self.inner.to_megatron(slab, captures, shard)

    def to_hf(self, shards: list[torch.Tensor], captures: dict[str, int], *given: Any) -> list[HFPiece]:
        pieces = self.inner.to_hf(shards, captures, *given)
        for piece in pieces:
            piece.expert, piece.num_experts = self._expert(captures), self.num_experts
        return pieces


class _ExpertSlab:
    def __init__(self, source: Source, expert: int, num_experts: int):
        self.source, self.expert, self.num_experts = source, expert, num_experts

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self.source.shape(name)
        if not shape or shape[0] != self.num_experts:
            raise BridgeError(
                f"{name}: stacked expert tensor has shape {list(shape)}, expected {self.num_experts}"
                " experts along dim 0 as the config says"
            )
        return shape[1:]

    def read(self, name: str, index: tuple[slice | int, ...]) -> torch.Tensor:
        return self.source.read(name, (self.expert, *index))


class Shifted(Wrapper):
    """A value transform around another mapping: Megatron = HF + delta, computed in fp32.

    For the one norm whose HF weight is plain while Megatron keeps it zero-centered (Qwen3.5 GDN
    `norm`, delta = -1). The core checks every dtype cast for exactness, so a value the shift cannot
    carry through the storage dtype is an error, not a silent change.
    """

    def __init__(self, inner: Mapping, delta: float):
        super().__init__(inner)
        self.delta = delta

    def __repr__(self) -> str:
        return f"Shifted[{self.delta:+g}]({self.inner!r})"

    def to_megatron(self, source: Source, captures: dict[str, int], shard: Shard) -> torch.Tensor:
        return self.inner.to_megatron(source, captures, shard).float() + self.delta

    def to_hf(self, shards: list[torch.Tensor], captures: dict[str, int], *given: Any) -> list[HFPiece]:
        return self.inner.to_hf([s.float() - self.delta for s in shards], captures, *given)
