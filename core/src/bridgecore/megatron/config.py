"""The Megatron-side config a plugin returns from ``provider_config``.

`ModelConfig` *is* a megatron-core ``TransformerConfig`` (no second config system) plus the
model-level fields GPTModel takes as arguments. Its defaults differ from ``TransformerConfig`` only
where conversion needs it: weights made on the CPU, no fused kernels, no grouped GEMM, so a model
builds on any machine and its params carry the names Megatron-LM's local specs use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core.transformer import TransformerConfig

#: the sizes every model's tensors are built from; larger values are corrupt configs, not models.
SIZES = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "ffn_hidden_size",
    "vocab_size",
)
#: the sizes only mixture-of-experts models have: absent (None) for dense ones.
MOE_SIZES = ("num_moe_experts", "moe_ffn_hidden_size")
MODEL_SIZES = SIZES + MOE_SIZES


@dataclass
class ModelConfig(TransformerConfig):
    vocab_size: int = 0
    max_sequence_length: int = 4096
    position_embedding_type: str = "rope"
    rotary_percent: float = 1.0
    rotary_base: float = 10000.0
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    share_embeddings_and_output_weights: bool = False
    #: the source config.json, written back unchanged on export.
    hf_config: dict[str, Any] = field(default_factory=dict)

    use_cpu_initialization: bool = True
    perform_initialization: bool = False
    apply_rope_fusion: bool = False
    bias_dropout_fusion: bool = False
    bias_activation_fusion: bool = False
    masked_softmax_fusion: bool = False
    persist_layer_norm: bool = False
    gradient_accumulation_fusion: bool = False
    moe_grouped_gemm: bool = False
    moe_token_dispatcher_type: str = "allgather"
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    def parallel_splits(self) -> dict[str, dict[str, int]]:
        """Sizes of this family that a parallel flag (``tp``, ``ep``, ``etp``) must divide, beyond the
        ``TransformerConfig`` ones the core checks, e.g. ``{"tp": {"sliding_num_attention_heads": 8}}``.

        The layout check refuses a layout that does not divide them before any work."""
        return {}

    def build_model(
        self, spec: Any, mtp_spec: Any, *, pre_process: bool, post_process: bool, vp_stage: int | None
    ) -> torch.nn.Module:
        """The model of one pipeline stage. Multimodal families override this."""
        from megatron.core.models.gpt import GPTModel

        return GPTModel(
            config=self,
            transformer_layer_spec=spec,
            vocab_size=self.vocab_size,
            max_sequence_length=self.max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
            position_embedding_type=self.position_embedding_type,
            rotary_percent=self.rotary_percent,
            rotary_base=self.rotary_base,
            rope_scaling=self.rope_scaling,
            rope_scaling_factor=self.rope_scaling_factor,
            mtp_block_spec=mtp_spec,
            vp_stage=vp_stage,
        )

    def forward_logits(self, model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-vocab logits [batch, seq, vocab] of a single-stage model (gathered over TP).

        Multimodal families override this."""
        batch, seq = input_ids.shape
        position_ids = torch.arange(seq).unsqueeze(0).expand(batch, seq)
        mask = torch.ones(seq, seq, dtype=torch.bool).triu(1).view(1, 1, seq, seq)
        # GPTModel runs its MTP block only to add a training loss, which needs labels; logits do not.
        mtp = (getattr(model, "mtp_process", False), model.config.mtp_num_layers)
        model.mtp_process, model.config.mtp_num_layers = False, None
        try:
            logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask)
        finally:
            model.mtp_process, model.config.mtp_num_layers = mtp
        return gather_vocab(logits)


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """The output layer leaves each TP rank its vocab slice; put the slices side by side."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if ps.get_tensor_model_parallel_world_size() == 1:
        return logits
    return gather_from_tensor_model_parallel_region(logits)
