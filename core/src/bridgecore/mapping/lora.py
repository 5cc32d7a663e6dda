"""LoRA weights mapped through the mapping of the weight they adapt, with no per-model code.

A linear's weight W (out x in) gets the delta ``scale * B @ A`` (B: out x r, A: r x in). Where W's
mapping cuts W's *rows* into HF tensors (a fused linear_qkv, gate+up fc1, GDN in_proj), the same cut
of B's rows gives each HF module's B, and every HF module shares A: ``B_i @ A`` is exactly W_i's
rows of the delta. Where it cuts W's *columns* (a row-parallel linear; over TP only, one HF tensor),
A is cut as W is and B is shared. So each mapping that splits a linear over TP yields these:

- the *split* weight (B of a column-parallel linear, A of a row-parallel one): the base mapping's
  own layout, on the LoRA tensors instead of the weights;
- the *shared* weight: one tensor, every HF module holds the same; Megatron splits its rows evenly
  over TP (Megatron-Bridge's adapter linears: A's rank rows, or B's output rows).

DoRA adds a magnitude per output row ("M"): Megatron-Bridge's ``adapter.weight_magnitude``, PEFT's
``lora_magnitude_vector``. Its rows are the weight's rows, so a column-parallel linear's follows the
base layout as B does; a row-parallel linear's is whole on every rank (its output is not split).

HF names are PEFT's: ``<module>.lora_A.weight``, ``<module>.lora_B.weight`` (and
``<module>.lora_magnitude_vector``) for the base weight ``<module>.weight``. A base mapping whose
HF tensors are not ``*.weight`` (experts packed into one tensor) or that needs other params has no
LoRA form here, and :func:`lora_mappings` says which.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from bridgecore.errors import BridgeError
from bridgecore.mapping.types import HFPiece, Mapping, Shard, Source, Stacked

#: Megatron-Bridge's adapter weights (after the adapted linear's module name) and PEFT's.
MEGATRON_SUFFIX = {"A": "adapter.linear_in.weight", "B": "adapter.linear_out.weight", "M": "adapter.weight_magnitude"}
HF_SUFFIX = {"A": "lora_A.weight", "B": "lora_B.weight", "M": "lora_magnitude_vector"}


def _renamed(text: str, suffix: str, what: str) -> str:
    if not text.endswith(".weight"):
        raise BridgeError(f"{what}: {text} is not a linear's weight; a LoRA adapter cannot be mapped onto it")
    return f"{text[: -len('weight')]}{suffix}"


class _Renamed:
    """A source that answers the base mapping's HF names with the LoRA tensors' names."""

    def __init__(self, source: Source, suffix: str):
        self.source, self.suffix = source, suffix

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(_renamed(name, self.suffix, name))

    def read(self, name: str, index: tuple[slice | int, ...]) -> torch.Tensor:
        return self.source.read(_renamed(name, self.suffix, name), index)


class LoRAWeight(Mapping):
    """LoRA weight ``which`` ("A", "B", or DoRA's magnitude "M") of the linear whose weight ``base`` maps."""

    def __init__(self, base: Mapping, which: str):
        if base.partition_dim not in (0, 1) or isinstance(base, Stacked):
            raise BridgeError(f"{base!r}: only a linear split over TP by rows or columns carries a LoRA adapter")
        if base.needs({}):
            raise BridgeError(f"{base!r}: its export needs other params; a LoRA adapter cannot be mapped onto it")
        self.base, self.which = base, which
        megatron = _renamed(base.megatron.text, MEGATRON_SUFFIX[which], repr(base))
        super().__init__(megatron, [_renamed(p.text, HF_SUFFIX[which], repr(base)) for p in base.hf])
        self.layers = base.layers
        #: whether this weight follows the base layout (else every HF module shares it)
        self.split = (which == "A") == (base.partition_dim == 1)

    def __repr__(self) -> str:
        return f"LoRA{self.which}({self.base!r})"

    @property
    def partition_dim(self) -> int | None:  # type: ignore[override]
        if self.split:
            return self.base.partition_dim
        return None if self.which == "M" else 0

    def to_megatron(self, source: Source, captures: dict[str, int], shard: Shard) -> torch.Tensor:
        if self.split:
            return self.base.to_megatron(_Renamed(source, HF_SUFFIX[self.which]), captures, shard)
        names = self.hf_names(captures)
        if self.which == "M":
            return source.read(names[0], ())
        rows = source.shape(names[0])[0]
        if rows % shard.size:
            raise BridgeError(f"{names[0]}: {rows} rows do not split over TP={shard.size}")
        per_rank = rows // shard.size
        return source.read(names[0], (slice(shard.rank * per_rank, (shard.rank + 1) * per_rank),))

    def to_hf(self, shards: list[torch.Tensor], captures: dict[str, int]) -> list[HFPiece]:
        if self.split:
            try:
                pieces = self.base.to_hf(shards, captures)
            except BridgeError as err:  # the base layout's refusal, said of this weight
                raise BridgeError(f"{self.megatron.format(captures)}: laid out as its linear's weight, {err}") from None
            return [HFPiece(_renamed(p.name, HF_SUFFIX[self.which], p.name), p.tensor) for p in pieces]
        full = torch.cat(shards) if len(shards) > 1 else shards[0]
        return [HFPiece(name, full) for name in self.hf_names(captures)]


def lora_mappings(base: Iterable[Mapping]) -> tuple[list[Mapping], list[tuple[Mapping, str]]]:
    """The LoRA weights' mappings of every base mapping that can carry them, and (mapping, why not)
    for every linear's mapping that cannot."""
    out: list[Mapping] = []
    refused: list[tuple[Mapping, str]] = []
    for m in base:
        if not m.megatron.text.endswith(".weight") or m.partition_dim is None:
            continue  # norms, biases, routers: never a LoRA target here
        try:
            out.extend([LoRAWeight(m, "A"), LoRAWeight(m, "B"), LoRAWeight(m, "M")])
        except BridgeError as err:
            refused.append((m, str(err)))
    return out, refused
