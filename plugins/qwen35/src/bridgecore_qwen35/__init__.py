"""bridgecore plugin for Qwen3.5 / Qwen3.6: dense and MoE, Gated-DeltaNet hybrid, MTP, text and VL checkpoints."""

from __future__ import annotations

from typing import Any

from bridgecore.hookspecs import hookimpl

# Imported before the hooks are defined: importing the submodule `mappings` later would rebind the
# package attribute `mappings` (the hook) to the module.
from bridgecore_qwen35.mappings import VISION_TENSORS, qwen35_mappings
from bridgecore_qwen35.provider import ARCHITECTURES, Qwen35Config, qwen35_config
from bridgecore_qwen35.spec import qwen35_layer_spec
from bridgecore_qwen35.tiny import TINY_MODELS

__version__ = "0.1.0"


def _ours(hf_config: dict[str, Any]) -> bool:
    arches = hf_config.get("architectures") or []
    return bool(arches) and arches[0] in ARCHITECTURES


@hookimpl
def architectures() -> list[str]:
    return list(ARCHITECTURES)


@hookimpl
def provider_config(hf_config: dict[str, Any]) -> Qwen35Config | None:
    return qwen35_config(hf_config) if _ours(hf_config) else None


@hookimpl
def layer_spec(config: Any, vp_stage: int | None) -> Any:
    return qwen35_layer_spec(config, vp_stage) if isinstance(config, Qwen35Config) else None


@hookimpl
def mappings(config: Any, hf_keys: frozenset[str]) -> list[Any] | None:
    return qwen35_mappings(config, hf_keys) if isinstance(config, Qwen35Config) else None


@hookimpl
def passthrough(config: Any, hf_keys: frozenset[str]) -> list[str] | None:
    # The vision tower of a VL checkpoint is not converted; the core keeps it verbatim instead.
    return [VISION_TENSORS] if isinstance(config, Qwen35Config) else None


@hookimpl
def tiny_models() -> list[Any]:
    return TINY_MODELS


@hookimpl
def hf_reference(hf_config: dict[str, Any]) -> Any:
    if not _ours(hf_config):
        return None
    from bridgecore_qwen35.reference import reference_logits

    return reference_logits
