"""Every Step-3.7 HF tensor <-> Megatron param relation.

The language model is Step-3.5's table with the Megatron prefix `language_model.`. On disk it is
either the released layout (`model.layers.*`, `vision_model.*`, `vit_large_projector.*`) or the
re-saved one (`model.language_model.*`, `model.vision_model.*`, `model.vit_large_projector.*`);
the layout is detected from the checkpoint's names and export writes back the one it read.
`lm_head.weight` is top-level in both. The tower and projector are replicated with the same names
under `vision_model.` on the Megatron side; the projector is `image_insert_embedding.align_projector`.
"""

from __future__ import annotations

from collections.abc import Collection

from bridgecore.plugin import Mapping, Replicated
from bridgecore_step35.mappings import HF_PREFIXES, detect_hf_prefix, step35_mappings
from bridgecore_step37.vision import Step37Config

LANGUAGE_MODEL = "language_model."
VISION_MODEL = "vision_model."
PROJECTOR = "image_insert_embedding.align_projector."
HF_PROJECTOR = "vit_large_projector."

_TOWER = (
    "conv1.weight",
    "positional_embedding",
    "ln_pre.weight",
    "ln_pre.bias",
    "vit_downsampler1.weight",
    "vit_downsampler1.bias",
    "vit_downsampler2.weight",
    "vit_downsampler2.bias",
)
_BLOCK = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ls_1.gamma",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
    "ls_2.gamma",
)


def is_resaved(hf_keys: Collection[str]) -> bool:
    """Whether the checkpoint uses the re-saved `model.language_model.` layout."""
    return detect_hf_prefix(hf_keys) == HF_PREFIXES[1]


def vision_mappings(config: Step37Config, hf_prefix: str) -> list[Mapping]:
    """The tower and the projector; `hf_prefix` is `` (released) or `model.` (re-saved)."""
    tower, block = f"{hf_prefix}{VISION_MODEL}", "transformer.resblocks.{block}."
    mappings: list[Mapping] = [Replicated(f"{VISION_MODEL}{name}", f"{tower}{name}") for name in _TOWER]
    mappings += [Replicated(f"{VISION_MODEL}{block}{name}", f"{tower}{block}{name}") for name in _BLOCK]
    projector = ("weight", "bias") if config.projector_bias else ("weight",)
    mappings += [Replicated(f"{PROJECTOR}{name}", f"{hf_prefix}{HF_PROJECTOR}{name}") for name in projector]
    return mappings


def step37_mappings(config: Step37Config, hf_keys: Collection[str]) -> list[Mapping]:
    resaved = is_resaved(hf_keys)
    text = step35_mappings(
        config, hf_keys, hf_prefix=HF_PREFIXES[1] if resaved else HF_PREFIXES[0], megatron_prefix=LANGUAGE_MODEL
    )
    return text + vision_mappings(config, "model." if resaved else "")
