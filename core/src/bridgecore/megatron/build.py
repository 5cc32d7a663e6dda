"""Building this rank's Megatron model chunks from a plugin's config and spec."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bridgecore.megatron.compat import cpu_compat
from bridgecore.megatron.config import ModelConfig
from bridgecore.megatron.specs import ModelSpec, gpt_mtp_spec


def build_chunks(
    config: ModelConfig, spec_for_stage: Callable[[int | None], Any], meta: bool = False
) -> list[torch.nn.Module]:
    """One model per virtual pipeline stage of this rank (a single one without VPP), in eval mode.

    With ``meta`` the tensors have shapes and no storage: enough to plan and to list names.
    """
    from megatron.core import parallel_state as ps

    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for stage in range(vpp or 1):
        vp_stage = stage if vpp else None
        spec = spec_for_stage(vp_stage)
        if isinstance(spec, ModelSpec):
            decoder, mtp = spec.decoder, spec.mtp
        else:
            layers = getattr(spec, "layer_specs", None)
            decoder, mtp = (
                spec,
                gpt_mtp_spec(config, layers[-1] if layers else spec, vp_stage) if config.mtp_num_layers else None,
            )
        with cpu_compat("meta" if meta else "cpu"):
            model = config.build_model(
                decoder,
                mtp,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage,
            )
        model.eval().requires_grad_(False)
        chunks.append(model)
    return chunks
