"""bridgecore plugin for StepFun Step-3.7 (`Step3p7ForConditionalGeneration`, model_type `step3p7`).

This module imports nothing heavy: `bridgecore plugins` and `--help` load it without torch or
megatron-core, and each hook imports what it uses. The hook on the `mappings` spec is named
`mapping_list` (``specname``), since importing the submodule `mappings` sets the package attribute
`mappings` to that module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bridgecore.plugin import hookimpl
from bridgecore_step37.architectures import ARCHITECTURE

if TYPE_CHECKING:
    from bridgecore.plugin import Mapping, TinyModel
    from bridgecore_step37.vision import Step37Config


#: the public names, imported from their submodules on first use
_EXPORTS = {
    "Step37Config": "bridgecore_step37.vision",
    "step37_model_config": "bridgecore_step37.provider",
    "step37_mappings": "bridgecore_step37.mappings",
}

__all__ = ["Step37Config", "step37_mappings", "step37_model_config"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def _is_step37(hf_config: dict[str, Any]) -> bool:
    architectures = hf_config.get("architectures") or []
    return ARCHITECTURE in architectures or (not architectures and hf_config.get("model_type") == "step3p7")


def _ours(config: Any) -> bool:
    from bridgecore_step37.vision import Step37Config

    return isinstance(config, Step37Config)


@hookimpl
def architectures() -> list[str]:
    return [ARCHITECTURE]


@hookimpl
def config_values() -> dict[str, str]:
    # Step-3.7's language model is Step-3.5's decoder, under text_config.
    from bridgecore_step35 import CONFIG_VALUES

    return dict(CONFIG_VALUES)


@hookimpl
def provider_config(hf_config: dict[str, Any]) -> Step37Config | None:
    if not _is_step37(hf_config):
        return None
    from bridgecore_step37.provider import step37_model_config

    return step37_model_config(hf_config)


@hookimpl
def layer_spec(config: Any, vp_stage: int | None) -> Any:
    if not _ours(config):
        return None
    from bridgecore_step37.spec import step37_spec

    return step37_spec(config, vp_stage)


@hookimpl(specname="mappings")
def mapping_list(config: Any, hf_keys: frozenset[str]) -> list[Mapping] | None:
    if not _ours(config):
        return None
    from bridgecore_step37.mappings import step37_mappings

    return step37_mappings(config, hf_keys)


@hookimpl
def tiny_models() -> list[TinyModel]:
    from bridgecore_step37.tiny import TINY

    return [TINY]


@hookimpl
def hf_reference(hf_config: dict[str, Any]) -> Any:
    if not _is_step37(hf_config):
        return None
    from bridgecore_step37.reference import step37_reference

    return step37_reference
