"""bridgecore plugin for Qwen3.5 / Qwen3.6: dense and MoE, Gated-DeltaNet hybrid, MTP, text and VL checkpoints.

This module imports nothing heavy: `bridgecore plugins` and `--help` load it without torch or
megatron-core, and each hook imports what it uses. The hook on the `mappings` spec is named
`mapping_list` (``specname``), since importing the submodule `mappings` sets the package attribute
`mappings` to that module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bridgecore.plugin import hookimpl
from bridgecore_qwen35.architectures import ARCHITECTURES

if TYPE_CHECKING:
    from bridgecore_qwen35.provider import Qwen35Config

__version__ = "0.1.0"


def _ours(hf_config: dict[str, Any]) -> bool:
    arches = hf_config.get("architectures") or []
    return bool(arches) and arches[0] in ARCHITECTURES


def _qwen35(config: Any) -> bool:
    from bridgecore_qwen35.provider import Qwen35Config

    return isinstance(config, Qwen35Config)


@hookimpl
def architectures() -> list[str]:
    return list(ARCHITECTURES)


#: Qwen3.5's own config.json keys and the values they must hold (checked by the core first).
CONFIG_VALUES = {
    "linear_conv_kernel_dim": "count",
    "linear_key_head_dim": "count",
    "linear_value_head_dim": "count",
    "linear_num_key_heads": "count",
    "linear_num_value_heads": "count",
    "full_attention_interval": "count",
    "mtp_num_hidden_layers": "count_or_zero",
    "num_experts": "count_or_zero",
    "num_experts_per_tok": "count",
    "moe_intermediate_size": "count",
    "shared_expert_intermediate_size": "count",
    "router_aux_loss_coef": "number",
}


@hookimpl
def config_values() -> dict[str, str]:
    return dict(CONFIG_VALUES)


@hookimpl
def provider_config(hf_config: dict[str, Any]) -> Qwen35Config | None:
    if not _ours(hf_config):
        return None
    from bridgecore_qwen35.provider import qwen35_config

    return qwen35_config(hf_config)


@hookimpl
def layer_spec(config: Any, vp_stage: int | None) -> Any:
    if not _qwen35(config):
        return None
    from bridgecore_qwen35.spec import qwen35_layer_spec

    return qwen35_layer_spec(config, vp_stage)


@hookimpl(specname="mappings")
def mapping_list(config: Any, hf_keys: frozenset[str]) -> list[Any] | None:
    if not _qwen35(config):
        return None
    from bridgecore_qwen35.mappings import qwen35_mappings

    return qwen35_mappings(config, hf_keys)


@hookimpl
def passthrough(config: Any, hf_keys: frozenset[str]) -> list[str] | None:
    # The vision tower of a VL checkpoint is not converted; the core keeps it verbatim instead.
    if not _qwen35(config):
        return None
    from bridgecore_qwen35.mappings import VISION_TENSORS

    return [VISION_TENSORS]


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
