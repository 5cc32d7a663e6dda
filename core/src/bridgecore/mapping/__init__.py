"""Parameter mappings between HF tensors and Megatron params: pure torch, no megatron import."""

from bridgecore.mapping.broadcast import Broadcast, Copies
from bridgecore.mapping.pattern import Pattern
from bridgecore.mapping.table import Binding, Coverage, MappingTable
from bridgecore.mapping.types import (
    ColumnParallel,
    Concat,
    FusedQKV,
    GatedMLP,
    HFPiece,
    Mapping,
    PackedGatedMLP,
    Replicated,
    RowParallel,
    Segment,
    Segmented,
    Shard,
    Shifted,
    Source,
    Stacked,
    TensorSource,
)

__all__ = [
    "Binding",
    "Broadcast",
    "ColumnParallel",
    "Concat",
    "Copies",
    "Coverage",
    "FusedQKV",
    "GatedMLP",
    "HFPiece",
    "Mapping",
    "MappingTable",
    "PackedGatedMLP",
    "Pattern",
    "Replicated",
    "RowParallel",
    "Segment",
    "Segmented",
    "Shard",
    "Shifted",
    "Source",
    "Stacked",
    "TensorSource",
]
