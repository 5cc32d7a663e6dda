"""bridgecore plugin for StepFun Step-3.5-Flash (`Step3p5ForCausalLM`, model_type `step3p5`)."""

from __future__ import annotations

from typing import Any

from bridgecore.hookspecs import hookimpl
from bridgecore.mapping import Mapping
from bridgecore.tiny import TinyModel
from bridgecore_step35.mappings import step35_mappings
from bridgecore_step35.provider import Step35Config, step35_model_config
from bridgecore_step35.tiny import TINY

ARCHITECTURE = "Step3p5ForCausalLM"

__all__ = ["Step35Config", "step35_mappings", "step35_model_config"]


def _is_step35(hf_config: dict[str, Any]) -> bool:
    architectures = hf_config.get("architectures") or []
    return ARCHITECTURE in architectures or (not architectures and hf_config.get("model_type") == "step3p5")


@hookimpl
def architectures() -> list[str]:
    return [ARCHITECTURE]


@hookimpl
def provider_config(hf_config: dict[str, Any]) -> Step35Config | None:
    return step35_model_config(hf_config) if _is_step35(hf_config) else None


@hookimpl
def layer_spec(config: Any, vp_stage: int | None) -> Any:
    if not isinstance(config, Step35Config):
        return None
    from bridgecore_step35.spec import step35_spec

    return step35_spec(config, vp_stage)


@hookimpl
def mappings(config: Any, hf_keys: frozenset[str]) -> list[Mapping] | None:
    return step35_mappings(config, hf_keys) if isinstance(config, Step35Config) else None


@hookimpl
def tiny_models() -> list[TinyModel]:
    return [TINY]


@hookimpl
def hf_reference(hf_config: dict[str, Any]) -> Any:
    if not _is_step35(hf_config):
        return None
    from bridgecore_step35.reference import step35_reference

    return step35_reference
