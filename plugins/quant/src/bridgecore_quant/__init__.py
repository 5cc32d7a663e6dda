"""bridgecore-quant: ModelOpt quantizer state (amax) for any model family, and FP8/NVFP4 HF export.

Opt-in by content: the amax mappings exist for every family, but quantizer buffers are attached to
a Megatron model only when its checkpoint carries ``*_quantizer._amax`` tensors, and the deployable
formats run only when the user asks for them with ``--quant``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bridgecore.plugin import hookimpl

if TYPE_CHECKING:
    from bridgecore.plugin import Mapping, MappingTable, ModelConfig, Source

#: the public names, imported from their submodules on first use (`bridgecore plugins` loads this
#: module without torch)
_EXPORTS = {
    "Amax": "bridgecore_quant.amax",
    "amax_mappings": "bridgecore_quant.amax",
    "QuantizerState": "bridgecore_quant.state",
    "attach_quantizers": "bridgecore_quant.state",
    "export_fp8": "bridgecore_quant.formats",
    "export_nvfp4": "bridgecore_quant.formats",
    "export_fp8_block": "bridgecore_quant.formats",
}

__all__ = [
    "Amax",
    "QuantizerState",
    "amax_mappings",
    "attach_quantizers",
    "export_fp8",
    "export_fp8_block",
    "export_nvfp4",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


@hookimpl
def quant_mappings(config: ModelConfig, mappings: list[Mapping], hf_keys: frozenset[str]) -> list[Mapping]:
    from bridgecore_quant.amax import amax_mappings

    return amax_mappings(mappings, hf_keys)


@hookimpl
def prepare_model(
    model: Any,
    config: ModelConfig,
    hf_keys: frozenset[str],
    table: MappingTable,
    source: Source | None,
    megatron_keys: frozenset[str] | None,
) -> None:
    """Attach quantizer state to one PP stage for every amax the checkpoint (or its record) has.

    Fused quantizers keep their HF linears' own amax beside them, unless the Megatron checkpoint
    being exported has none (a training run saves only ``_amax``)."""
    from megatron.core import parallel_state as ps

    from bridgecore_quant.amax import PARTS
    from bridgecore_quant.state import attach_quantizers, fused_notes, global_namer, has_amax

    if source is None or not has_amax(hf_keys):
        return
    if hasattr(source, "read") and getattr(model, "vp_stage", None) in (None, 0) and _rank() == 0:
        # Importing from the HF checkpoint itself (a Megatron checkpoint's record has no values).
        for note in fused_notes(table, source, hf_keys):
            print(f"note: {note}", flush=True)
    attach_quantizers(
        model,
        table,
        source,
        hf_keys,
        global_namer(model, config),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_expert_tensor_parallel_world_size(),
        keep_parts=megatron_keys is None or any(k.endswith(PARTS) for k in megatron_keys),
    )


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


@hookimpl
def export_formats() -> dict[str, Any]:
    from bridgecore.plugin import BlockFP8
    from bridgecore_quant.formats import export_fp8, export_fp8_block, export_nvfp4

    return {"fp8": export_fp8, "nvfp4": export_nvfp4, BlockFP8.FORMAT: export_fp8_block}
