"""bridgecore plugin for StepFun Step-3.7 (`Step3p7ForConditionalGeneration`, model_type `step3p7`)."""

from __future__ import annotations

from typing import Any

from bridgecore.hookspecs import hookimpl
from bridgecore.mapping import Mapping
from bridgecore.tiny import TinyModel
from bridgecore_step37.mappings import step37_mappings
from bridgecore_step37.provider import ARCHITECTURE, Step37Config, step37_model_config
from bridgecore_step37.tiny import TINY

__all__ = ["Step37Config", "step37_mappings", "step37_model_config"]


def _is_step37(hf_config: dict[str, Any]) -> bool:
    architectures = hf_config.get("architectures") or []
    return ARCHITECTURE in architectures or (not architectures and hf_config.get("model_type") == "step3p7")


@hookimpl
def architectures() -> list[str]:
    return [ARCHITECTURE]


@hookimpl
def provider_config(hf_config: dict[str, Any]) -> Step37Config | None:
    return step37_model_config(hf_config) if _is_step37(hf_config) else None


@hookimpl
def layer_spec(config: Any, vp_stage: int | None) -> Any:
    if not isinstance(config, Step37Config):
        return None
    from bridgecore_step37.spec import step37_spec

    return step37_spec(config, vp_stage)


@hookimpl
def mappings(config: Any, hf_keys: frozenset[str]) -> list[Mapping] | None:
    return step37_mappings(config, hf_keys) if isinstance(config, Step37Config) else None


@hookimpl
def tiny_models() -> list[TinyModel]:
    return [TINY]


@hookimpl
def hf_reference(hf_config: dict[str, Any]) -> Any:
    if not _is_step37(hf_config):
        return None
    from bridgecore_step37.reference import step37_reference

    return step37_reference
