"""A norm module for local (non-Transformer-Engine) specs that supports zero-centered gamma.

megatron-core's local fallback (``WrappedTorchNorm``) refuses ``layernorm_zero_centered_gamma``,
which Step-3.5 and Qwen3.5 need. This module has the same constructor and parameter names
(``weight``, ``bias`` for LayerNorm) and computes in fp32 like the HF models do.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class LocalNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.zero_centered = bool(config.layernorm_zero_centered_gamma)
        self.eps = eps
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, x = x.dtype, x.float()
        if self.rms:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            x = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps)
        weight = self.weight.float() + 1 if self.zero_centered else self.weight.float()
        x = x * weight
        if self.bias is not None:
            x = x + self.bias.float()
        return x.to(dtype)
