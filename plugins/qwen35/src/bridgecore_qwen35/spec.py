"""The Qwen3.5 layer specs: megatron-core's hybrid Gated-DeltaNet block, built without Transformer Engine.

megatron-core builds this block with ``get_transformer_block_with_experimental_attention_variant_spec``,
which insists on Transformer Engine. Its parts take any backend, so this module supplies a local one
(:class:`LocalFusedBackend`) and assembles the block from those parts the same way: GDN or gated
full attention per ``linear_attention_freq``, MoE or dense MLP per ``moe_layer_freq``.

The one module the local backend lacks is a norm fused into a column-parallel linear (the GDN spec
requires it for ``in_proj``). :class:`NormColumnParallelLinear` is that module with Transformer
Engine's parameter names (``weight``, ``layer_norm_weight``), and it is used wherever the TE build
fuses the input norm (``in_proj``, ``linear_qkv``, dense ``linear_fc1``), so the Megatron names are
those of the TE build that Megatron-LM trains Qwen3.5 with.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from bridgecore.plugin import LocalNorm, ModelSpec


class NormColumnParallelLinear(MegatronModule):
    """RMSNorm (zero-centered when the config says so, computed in fp32), then a column-parallel linear.

    Parameters as Transformer Engine's LayerNormColumnParallelLinear: ``layer_norm_weight``
    (replicated), ``weight`` (and ``bias``) split over TP along dim 0, marked with megatron-core's
    tensor-parallel attributes. Sequence parallelism and gathered output are not supported.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: Any,
        init_method: Any,
        bias: bool,
        skip_bias_add: bool,
        gather_output: bool = False,
        is_expert: bool = False,
        stride: int = 1,
        tp_group: Any = None,
        **_: Any,
    ):
        from megatron.core.tensor_parallel.layers import (
            set_tensor_model_parallel_attributes,
        )
        from megatron.core.utils import get_tensor_model_parallel_group_if_none

        super().__init__(config)
        if config.normalization != "RMSNorm" or config.sequence_parallel or gather_output or is_expert:
            raise ValueError(f"{type(self).__name__}: RMSNorm without sequence parallelism or gathered output only")
        self.tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)
        tp = self.tp_group.size()
        if output_size % tp:
            raise ValueError(f"{type(self).__name__}: {output_size} outputs do not split over TP={tp}")
        self.zero_centered = bool(config.layernorm_zero_centered_gamma)
        self.eps, self.skip_bias_add = config.layernorm_epsilon, skip_bias_add
        init = torch.zeros if self.zero_centered else torch.ones
        self.layer_norm_weight = torch.nn.Parameter(init(input_size, dtype=config.params_dtype))
        self.layer_norm_weight.sequence_parallel = False
        self.weight = torch.nn.Parameter(torch.empty(output_size // tp, input_size, dtype=config.params_dtype))
        if config.perform_initialization:
            init_method(self.weight)
        set_tensor_model_parallel_attributes(self.weight, True, 0, stride)
        self.bias = None
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(output_size // tp, dtype=config.params_dtype))
            set_tensor_model_parallel_attributes(self.bias, True, 0, stride)

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        """The input the linear multiplies (what a LoRA adapter on this linear takes too)."""
        dtype, h = x.dtype, x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.layer_norm_weight.float()
        return (h * (weight + 1 if self.zero_centered else weight)).to(dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
        )

        h = copy_to_tensor_model_parallel_region(self.normed(x), group=self.tp_group)
        out = torch.nn.functional.linear(h, self.weight, None if self.skip_bias_add else self.bias)
        return out, self.bias if self.skip_bias_add else None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> Any:
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state,
            prefix,
            {"weight": 0, "bias": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )


class LocalFusedBackend(LocalSpecProvider):
    """megatron-core's local modules, plus a fused norm + column-parallel linear and :class:`LocalNorm`."""

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self) -> type:
        return NormColumnParallelLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return LocalNorm


def _attention_spec(backend: LocalFusedBackend) -> ModuleSpec:
    """Gated self-attention with q/k norms, input norm fused into ``linear_qkv`` (the TE layout)."""
    from megatron.core.transformer.attention import (
        SelfAttention,
        SelfAttentionSubmodules,
    )
    from megatron.core.transformer.enums import AttnMaskType

    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_layer_norm_linear(),
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=backend.layer_norm(rms_norm=True, for_qk=True),
            k_layernorm=backend.layer_norm(rms_norm=True, for_qk=True),
        ),
        metainfo={"fuse_input_layernorm": True},
    )


def _mlp_and_fused_norm(spec: Any) -> tuple[Any, bool]:
    """The MLP spec and whether its pre-MLP norm is fused into it.

    megatron-core 0.19 returns these as a pair (the MLP as a builder); 0.16 returns a ModuleSpec
    carrying the flag in its metainfo.
    """
    if isinstance(spec, tuple):
        return spec
    return spec, spec.metainfo["fuse_pre_mlp_layernorm"]


def _layer_spec(attention: ModuleSpec, mlp: tuple[Any, bool], backend: LocalFusedBackend) -> ModuleSpec:
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    norm = backend.layer_norm(rms_norm=True)
    mlp, fused_pre_mlp_norm = mlp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if attention.metainfo["fuse_input_layernorm"] else norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp if fused_pre_mlp_norm else norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def qwen35_layer_spec(config: Any, vp_stage: int | None = None) -> ModelSpec:
    """Decoder block of this pipeline stage, and the MTP block (full attention + the model's MLP)."""
    from megatron.core.models.gpt import (
        experimental_attention_variant_module_specs as hybrid,
    )
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_mtp_block_spec_for_backend,
    )
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    backend = LocalFusedBackend()
    gdn = hybrid.get_gated_delta_net_module_spec(config, backend=backend)
    attention = _attention_spec(backend)
    if config.num_moe_experts:
        mlp = _mlp_and_fused_norm(hybrid._get_moe_module_spec(config, backend=backend))
    else:
        mlp = _mlp_and_fused_norm(hybrid._get_dense_mlp_module_spec(config, backend=backend))
    linear = hybrid.get_linear_attention_pattern(config)
    layers = [_layer_spec(gdn if is_linear else attention, mlp, backend) for is_linear in linear]

    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    block = TransformerBlockSubmodules(
        layer_specs=layers[offset : offset + count], layer_norm=backend.layer_norm(rms_norm=True)
    )
    mtp = None
    if config.mtp_num_layers:
        mtp = get_gpt_mtp_block_spec_for_backend(
            config, _layer_spec(attention, mlp, backend), backend=backend, vp_stage=vp_stage
        )
    return ModelSpec(block, mtp)
