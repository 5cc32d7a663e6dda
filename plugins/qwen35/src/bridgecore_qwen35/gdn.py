"""Gated-DeltaNet on a machine where flash-linear-attention cannot run, in one scoped place.

megatron-core's ``GatedDeltaNet`` refuses to construct without the ``fla`` package and calls its
Triton kernels in forward: ``l2norm`` on q and k, ``chunk_gated_delta_rule`` and (from 0.19)
``causal_conv1d``. fla installs beside a CPU torch but its kernels fail there ("0 active drivers"),
so on CPU they are swapped for torch code: megatron-core's own ``torch_chunk_gated_delta_rule`` (the
one its deterministic mode uses), an l2norm with fla's formula and a depthwise causal conv. Inside
:func:`torch_gdn_kernels` only ``HAVE_FLA`` and those kernel names change, in the modules GatedDeltaNet
reads them from (``megatron.core.ssm.gated_delta_net`` in 0.16; its ``common`` and ``gdn`` submodules
in 0.19); nothing changes when CUDA and fla are both present.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """fla's ``l2norm``: x / sqrt(sum(x²) + eps) along ``dim``."""
    return x * torch.rsqrt((x * x).sum(dim=dim, keepdim=True) + eps)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    **_: object,
) -> tuple[torch.Tensor, None]:
    """fla's ``causal_conv1d`` on [b, s, d] with a [d, w] weight, without cache or packed sequences."""
    if initial_state is not None or output_final_state or cu_seqlens is not None:
        raise NotImplementedError("causal_conv1d on CPU: no conv state and no packed sequences")
    seq_len, width = x.shape[1], weight.shape[-1]
    out = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[-1])
    out = out[..., :seq_len]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return out.transpose(1, 2), None


@contextlib.contextmanager
def torch_gdn_kernels() -> Iterator[None]:
    from megatron.core.ssm import gated_delta_net as gdn

    if gdn.HAVE_FLA and torch.cuda.is_available():
        yield
        return
    kernels = {
        "HAVE_FLA": True,
        "l2norm": l2norm,
        "causal_conv1d": causal_conv1d,
        "chunk_gated_delta_rule": gdn.torch_chunk_gated_delta_rule,
    }
    modules = [gdn, *(getattr(gdn, name) for name in ("common", "gdn") if hasattr(gdn, name))]
    with contextlib.ExitStack() as stack:
        for module in modules:
            for name, value in kernels.items():
                stack.enter_context(mock.patch.object(module, name, value, create=True))
        yield
