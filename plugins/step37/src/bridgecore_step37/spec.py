"""The Step-3.7 language model's megatron-core spec: Step-3.5's, unchanged.

The vision tower and projector are not spec-built (see `vision.py`); `Step37Config.build_model`
adds them around the GPTModel this spec describes.
"""

from __future__ import annotations

from bridgecore.plugin import ModelSpec
from bridgecore_step35.spec import step35_spec
from bridgecore_step37.vision import Step37Config


def step37_spec(config: Step37Config, vp_stage: int | None = None) -> ModelSpec:
    """Decoder and MTP block specs of this pipeline stage's language model."""
    return step35_spec(config, vp_stage)
