"""Spec helpers for plugins: megatron-core's own local specs, made to build and run on a CPU.

The only change to megatron-core's specs is the norm class: its local fallback cannot do
zero-centered gamma, so every norm in the spec tree becomes :class:`LocalNorm` (same constructor,
same parameter names). Everything else is megatron-core's spec as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from bridgecore.megatron.norms import LocalNorm

_NORMS: tuple[type, ...] = (WrappedTorchNorm,)
try:  # apex's fused norm is what the local spec picks when apex is installed
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

    _NORMS += (FusedLayerNorm,)
except ImportError:  # pragma: no cover - depends on the environment
    pass


@dataclass
class ModelSpec:
    """What ``layer_spec`` may return when the model has an MTP block with its own layer spec."""

    decoder: Any
    mtp: Any = None


def with_local_norms(spec: Any) -> Any:
    """A copy of a spec tree in which every megatron-core local norm is :class:`LocalNorm`."""
    if isinstance(spec, type):
        return LocalNorm if issubclass(spec, _NORMS) else spec
    if isinstance(spec, (list, tuple)):
        return type(spec)(with_local_norms(s) for s in spec)
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(
            spec,
            module=with_local_norms(spec.module),
            submodules=with_local_norms(spec.submodules),
        )
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: with_local_norms(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
        return dataclasses.replace(spec, **changes)
    return spec


def gpt_block_spec(config: Any, vp_stage: int | None = None) -> Any:
    """megatron-core's GPT decoder block spec (dense/MoE per ``moe_layer_freq``) with local modules."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, normalization=config.normalization, vp_stage=vp_stage
    )
    return with_local_norms(spec)


def gpt_mtp_spec(config: Any, layer_spec: Any, vp_stage: int | None = None) -> Any:
    """megatron-core's MTP block spec around one decoder layer spec, with local modules."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    if not config.mtp_num_layers:
        return None
    return with_local_norms(get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=False, vp_stage=vp_stage))
