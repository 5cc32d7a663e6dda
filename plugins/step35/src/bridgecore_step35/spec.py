"""The Step-3.5 megatron-core spec: megatron-core's local GPT specs with Step-3.5 module subclasses.

- `Step35Layer` (a TransformerLayer) builds itself from `config.layer_config(i)`, so each layer has
  its own head count (64 vs 96: different `linear_qkv`/`linear_proj` shapes), window, rope base and
  fraction, and SwiGLU clamps; it runs its own rotary embedding because GPTModel has one model-wide.
- The head-wise gate is megatron-core's `attention_output_gate` with every gate row repeated over the
  head's d rows (see `mappings.py`): megatron-core 0.16.1 has no per-head gate, and the repeated
  rows give the same sigmoid(g_h) on every channel of head h.
- `WindowedDotProductAttention` applies the sliding window on the scores' device.
- `ClampedSwiGLUMLP` and friends: Step-3.5 clamps silu(gate) from above and up on both sides; the
  megatron-core clamp acts on gate *before* silu, which is a different function. `Step35Layer`
  gives its MLPs these classes after building them as megatron-core's.
- MTP layers are dense whatever the last decoder layer is, and each `Step35MTPLayer` has its own
  `output_layer` (HF `transformer.shared_head.output`), so the per-layer heads survive conversion.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

from bridgecore.plugin import BridgeError, ModelSpec, gpt_block_spec, gpt_mtp_spec, with_local_norms
from bridgecore_step35.provider import Step35Config


class LayerRotaryEmbedding(RotaryEmbedding):
    """Rotary embedding of one layer: its base and fraction, llama3-scaled on the configured types."""

    def __init__(self, config: Step35Config, index: int):
        layer = config.layer_config(index)
        super().__init__(
            kv_channels=layer.kv_channels,
            rotary_percent=layer.rotary_percent,
            rotary_base=layer.rotary_base,
            use_cpu_initialization=True,
        )
        if config.rope_scaled(index):
            self.inv_freq = self._apply_scaling(self.inv_freq, **config.llama3_rope)


class Step35Layer(TransformerLayer):
    """A decoder or MTP layer built from its own per-layer config (global index from `layer_number`)."""

    def __init__(
        self, config: Step35Config, submodules: Any, layer_number: int = 1, vp_stage: int | None = None, **kwargs: Any
    ):
        if kwargs.get("is_mtp_layer"):
            # megatron-core >= 0.19 numbers an MTP block's inner layer by its MTP depth (from 1) and
            # says so with `is_mtp_layer`; 0.16 continued the decoder's numbering (next branch).
            index = config.num_layers + layer_number - 1
        else:
            index = layer_number - 1 + get_transformer_layer_offset(config, vp_stage)
        super().__init__(config.layer_config(index), submodules, layer_number, vp_stage=vp_stage, **kwargs)
        self.rotary = LayerRotaryEmbedding(config, index)
        self._clamp_swiglu()

    def _clamp_swiglu(self) -> None:
        """Give every MLP of this layer Step-3.5's clamped SwiGLU.

        The MLPs are built as megatron-core's own classes (TransformerLayer passes its process
        groups only to those it knows, and SequentialMLP instantiates `MLP` by name); the clamped
        classes differ only in `forward`, so each module is re-classed in place.
        """
        for name, module in self.mlp.named_modules():
            if type(module) is MLP:
                routed = ".local_experts." in f".{name}."
                module.__class__ = ClampedExpertMLP if routed else ClampedSwiGLUMLP
            elif type(module) is SharedExpertMLP:
                module.__class__ = ClampedSharedExpertMLP

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("rotary_pos_cos") is not None:
            raise BridgeError(
                f"layer {self.layer_number}: Step-3.5 layers make their own rotary embedding;"
                " precomputed rotary cos/sin (flash decoding) are not supported"
            )
        model_wide = kwargs.get("rotary_pos_emb")
        if model_wide is not None:
            # Same positions as GPTModel's embedding (local attention has no context parallelism).
            kwargs["rotary_pos_emb"] = self.rotary(model_wide.shape[0])
        return super().forward(*args, **kwargs)


class WindowedDotProductAttention(DotProductAttention):
    """DotProductAttention whose sliding-window band is built on the scores' device.

    megatron-core 0.16.1 makes the band with `device="cuda"`, and, when a window is set, ignores the
    mask it is given; here the band is OR-ed into that mask (or the causal mask when none is given).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.window = self.scale_mask_softmax.window_size
        self.scale_mask_softmax.window_size = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.window is not None:
            sq, sk = query.shape[0], key.shape[0]
            keep = torch.ones(sq, sk, dtype=torch.bool, device=query.device)
            keep = keep.triu(sk - sq - self.window[0]).tril(sk - sq + self.window[1])
            band = ~keep.view(1, 1, sq, sk)
            attention_mask = band if attention_mask is None else attention_mask | band
        return super().forward(query, key, value, attention_mask, *args, **kwargs)


class ClampedSwiGLUMLP(MLP):
    """SwiGLU with Step-3.5's clamps: min(silu(gate), L) * clamp(up, -L, L); none when L is None.

    Routed experts read the layer's `swiglu_limit`, every other MLP `swiglu_limit_shared`.
    """

    routed = False

    @property
    def limit(self) -> float | None:
        return self.config.swiglu_limit if self.routed else self.config.swiglu_limit_shared

    def forward(
        self, hidden_states: torch.Tensor, per_token_scale: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        limit = self.limit
        if limit is None:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        fc1, _ = self.linear_fc1(hidden_states)  # Step-3.5 linears have no bias
        gate, up = torch.chunk(fc1, 2, dim=-1)
        out = F.silu(gate).clamp(max=limit) * up.clamp(min=-limit, max=limit)
        if per_token_scale is not None:
            out = (out * per_token_scale.unsqueeze(-1)).to(fc1.dtype)
        return self.linear_fc2(out)


class ClampedExpertMLP(ClampedSwiGLUMLP):
    routed = True


class ClampedSharedExpertMLP(SharedExpertMLP, ClampedSwiGLUMLP):
    """SharedExpertMLP whose `super().forward` resolves to the clamped SwiGLU (MRO)."""


class Step35MTPLayer(MultiTokenPredictionLayer):
    """An MTP layer with its own output head (HF `model.layers.{N+j}.transformer.shared_head.output`)."""

    def __init__(self, config: Step35Config, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        self.output_layer = ColumnParallelLinear(
            config.hidden_size,
            config.vocab_size,
            config=config,
            init_method=config.init_method,
            bias=False,
            skip_bias_add=False,
            gather_output=False,
        )


_STEP35_MODULES: dict[type, type] = {
    TransformerLayer: Step35Layer,
    DotProductAttention: WindowedDotProductAttention,
    MultiTokenPredictionLayer: Step35MTPLayer,
}


def with_step35_modules(spec: Any) -> Any:
    """A copy of a spec tree with each megatron-core module class replaced by its Step-3.5 subclass."""
    if isinstance(spec, type):
        return _STEP35_MODULES.get(spec, spec)
    if isinstance(spec, (list, tuple)):
        return type(spec)(with_step35_modules(s) for s in spec)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: with_step35_modules(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
        return dataclasses.replace(spec, **changes)
    return spec


def step35_dense_layer_spec(config: Step35Config) -> ModuleSpec:
    """megatron-core's local dense layer spec (the MTP layers' spec), local norms, no Step-3.5 swaps yet."""
    spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization=config.normalization)
    return with_local_norms(spec)


def step35_spec(config: Step35Config, vp_stage: int | None = None) -> ModelSpec:
    """Decoder block spec of this pipeline stage and the MTP block spec (None off the last stage)."""
    decoder = with_step35_modules(gpt_block_spec(config, vp_stage))
    mtp = gpt_mtp_spec(config, step35_dense_layer_spec(config), vp_stage)
    return ModelSpec(decoder, with_step35_modules(mtp))
