"""The public API for plugin authors: everything a model-family plugin may import from the core.

A plugin imports ``bridgecore.plugin`` (and, in its tests, ``bridgecore.testing``), never another core
module: what is named here is what the core promises to keep. The hooks themselves are documented
in :mod:`bridgecore.hookspecs`; ``docs/plugins.md`` is the guide.

- hooks: :data:`hookimpl`, :class:`TransformersModel`, :class:`TinyModel`;
- config and spec: :class:`ModelConfig`, :class:`ModelSpec`, :func:`gpt_block_spec`,
  :func:`gpt_mtp_spec`, :func:`with_local_norms`, :class:`LocalNorm`, :func:`gather_vocab`;
- mappings: :class:`Mapping` and its types (``Replicated``, ``ColumnParallel``, ``RowParallel``,
  ``FusedQKV``, ``GatedMLP``, ``PackedGatedMLP``, ``Concat``, ``Stacked``, ``Shifted``,
  ``Broadcast``), :class:`MappingTable`, :class:`Pattern`, :class:`HFPiece`, :class:`Shard`,
  :class:`Source`, :class:`TensorSource`;
- names: :func:`global_name` (a rank's local Megatron name as the mappings speak it);
- tiny checkpoints: :func:`write_checkpoint`, :func:`random_tensor`;
- HF files, for plugins that write formats of their own (``export_formats``): :class:`CheckpointReader`,
  :class:`ShardedWriter`, :func:`check_target`, :func:`copy_side_files`, ``DEFAULT_MAX_SHARD_SIZE``;
  the FP8 block format as the core reads it: :class:`BlockFP8`, :func:`dequantize_blocks`;
- errors: :class:`BridgeError`, the one-line error every refusal raises.

Names other than ``hookimpl``, ``TransformersModel`` and ``BridgeError`` are imported on first use,
so a plugin's top-level module that imports only those stays free of torch and megatron-core
(``bridgecore plugins`` and ``--help`` load every plugin's module).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridgecore.errors import BridgeError
from bridgecore.hookspecs import TransformersModel, hookimpl
from bridgecore.lazy import lazy_exports

if TYPE_CHECKING:
    from bridgecore.hf.config import copy_side_files
    from bridgecore.hf.quantized import BlockFP8, dequantize_blocks
    from bridgecore.hf.reader import CheckpointReader
    from bridgecore.hf.writer import DEFAULT_MAX_SHARD_SIZE, ShardedWriter, check_target
    from bridgecore.mapping import (
        Broadcast,
        ColumnParallel,
        Concat,
        FusedQKV,
        GatedMLP,
        HFPiece,
        Mapping,
        MappingTable,
        PackedGatedMLP,
        Pattern,
        Replicated,
        RowParallel,
        Shard,
        Shifted,
        Source,
        Stacked,
        TensorSource,
    )
    from bridgecore.megatron.config import ModelConfig, gather_vocab
    from bridgecore.megatron.norms import LocalNorm
    from bridgecore.megatron.params import global_name
    from bridgecore.megatron.specs import ModelSpec, gpt_block_spec, gpt_mtp_spec, with_local_norms
    from bridgecore.tiny import TinyModel, random_tensor, write_checkpoint

_MODULES = {
    "bridgecore.hf.config": ("copy_side_files",),
    "bridgecore.hf.quantized": ("BlockFP8", "dequantize_blocks"),
    "bridgecore.hf.reader": ("CheckpointReader",),
    "bridgecore.hf.writer": ("DEFAULT_MAX_SHARD_SIZE", "ShardedWriter", "check_target"),
    "bridgecore.mapping": (
        "Broadcast",
        "ColumnParallel",
        "Concat",
        "FusedQKV",
        "GatedMLP",
        "HFPiece",
        "Mapping",
        "MappingTable",
        "PackedGatedMLP",
        "Pattern",
        "Replicated",
        "RowParallel",
        "Shard",
        "Shifted",
        "Source",
        "Stacked",
        "TensorSource",
    ),
    "bridgecore.megatron.config": ("ModelConfig", "gather_vocab"),
    "bridgecore.megatron.norms": ("LocalNorm",),
    "bridgecore.megatron.params": ("global_name",),
    "bridgecore.megatron.specs": ("ModelSpec", "gpt_block_spec", "gpt_mtp_spec", "with_local_norms"),
    "bridgecore.tiny": ("TinyModel", "random_tensor", "write_checkpoint"),
}

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "BlockFP8",
    "Broadcast",
    "BridgeError",
    "CheckpointReader",
    "ColumnParallel",
    "Concat",
    "FusedQKV",
    "GatedMLP",
    "HFPiece",
    "LocalNorm",
    "Mapping",
    "MappingTable",
    "ModelConfig",
    "ModelSpec",
    "PackedGatedMLP",
    "Pattern",
    "Replicated",
    "RowParallel",
    "Shard",
    "ShardedWriter",
    "Shifted",
    "Source",
    "Stacked",
    "TensorSource",
    "TinyModel",
    "TransformersModel",
    "check_target",
    "copy_side_files",
    "dequantize_blocks",
    "gather_vocab",
    "global_name",
    "gpt_block_spec",
    "gpt_mtp_spec",
    "hookimpl",
    "random_tensor",
    "with_local_norms",
    "write_checkpoint",
]

__getattr__ = lazy_exports(__name__, _MODULES)
