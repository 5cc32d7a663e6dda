"""bridgecore plugin for Qwen3.5 / Qwen3.6: dense and MoE, Gated-DeltaNet hybrid, MTP, text and VL checkpoints."""

from __future__ import annotations

from typing import Any

from bridgecore.hookspecs import hookimpl

from bridgecore_qwen35.provider import ARCHITECTURES, Qwen35Config, qwen35_config

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
    from bridgecore_qwen35.spec import qwen35_layer_spec

    return qwen35_layer_spec(config, vp_stage) if isinstance(config, Qwen35Config) else None


@hookimpl
def mappings(config: Any, hf_keys: frozenset[str]) -> list[Any] | None:
    from bridgecore_qwen35.mappings import qwen35_mappings

    return qwen35_mappings(config, hf_keys) if isinstance(config, Qwen35Config) else None


@hookimpl
def tiny_models() -> list[Any]:
    from bridgecore_qwen35.tiny import TINY_MODELS

    return TINY_MODELS


@hookimpl
def hf_reference(hf_config: dict[str, Any]) -> Any:
    if not _ours(hf_config):
        return None
    from bridgecore_qwen35.reference import reference_logits

    return reference_logits
