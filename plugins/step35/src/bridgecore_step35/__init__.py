"""bridgecore plugin for StepFun Step-3.5-Flash (`Step3p5ForCausalLM`, model_type `step3p5`).

This module imports nothing heavy: `bridgecore plugins` and `--help` load it without torch or
megatron-core, and each hook imports what it uses. The hook on the `mappings` spec is named
`mapping_list` (``specname``), since importing the submodule `mappings` sets the package attribute
`mappings` to that module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bridgecore.plugin import hookimpl
from bridgecore_step35.architectures import ARCHITECTURE

if TYPE_CHECKING:
    from bridgecore.plugin import Mapping, TinyModel
    from bridgecore_step35.provider import Step35Config


#: the public names, imported from their submodules on first use
_EXPORTS = {
    "Step35Config": "bridgecore_step35.provider",
    "step35_model_config": "bridgecore_step35.provider",
    "step35_mappings": "bridgecore_step35.mappings",
}

__all__ = ["Step35Config", "step35_mappings", "step35_model_config"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def _is_step35(hf_config: dict[str, Any]) -> bool:
    architectures = hf_config.get("architectures") or []
    return ARCHITECTURE in architectures or (not architectures and hf_config.get("model_type") == "step3p5")


def _ours(config: Any) -> bool:
    from bridgecore_step35.provider import Step35Config

    return isinstance(config, Step35Config)


@hookimpl
def architectures() -> list[str]:
    return [ARCHITECTURE]


#: Step-3.5's own config.json keys (released and transformers spellings) and the values they must
#: hold; a per-layer list is checked item by item. The core checks them before ``provider_config``.
CONFIG_VALUES = {
    "moe_num_experts": "count_or_zero",
    "n_routed_experts": "count_or_zero",
    "moe_top_k": "count",
    "num_experts_per_tok": "count",
    "moe_intermediate_size": "count",
    "share_expert_dim": "count",
    "share_expert_dims": "count_or_zero",
    "num_attention_groups": "count",
    "num_sliding_attention_heads": "count",
    "sliding_window": "count",
    "num_nextn_predict_layers": "count_or_zero",
    "num_mtp_layers": "count_or_zero",
    "partial_rotary_factors": "fraction",
    "moe_router_scaling_factor": "positive",
    "query_pre_attn_scalar": "positive",
    "swiglu_limits": "number",
    "swiglu_limits_shared": "number",
    "factor": "positive",
    "low_freq_factor": "positive",
    "high_freq_factor": "positive",
    "original_max_position_embeddings": "count",
}


@hookimpl
def config_values() -> dict[str, str]:
    return dict(CONFIG_VALUES)


@hookimpl
def provider_config(hf_config: dict[str, Any]) -> Step35Config | None:
    if not _is_step35(hf_config):
        return None
    from bridgecore_step35.provider import step35_model_config

    return step35_model_config(hf_config)


@hookimpl
def layer_spec(config: Any, vp_stage: int | None) -> Any:
    if not _ours(config):
        return None
    from bridgecore_step35.spec import step35_spec

    return step35_spec(config, vp_stage)


@hookimpl(specname="mappings")
def mapping_list(config: Any, hf_keys: frozenset[str]) -> list[Mapping] | None:
    if not _ours(config):
        return None
    from bridgecore_step35.mappings import step35_mappings

    return step35_mappings(config, hf_keys)


@hookimpl
def tiny_models() -> list[TinyModel]:
    from bridgecore_step35.tiny import TINY

    return [TINY]


@hookimpl
def hf_reference(hf_config: dict[str, Any]) -> Any:
    if not _is_step35(hf_config):
        return None
    from bridgecore_step35.reference import step35_reference

    return step35_reference
