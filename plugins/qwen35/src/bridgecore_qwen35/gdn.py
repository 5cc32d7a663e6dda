"""Gated-DeltaNet on a machine where flash-linear-attention cannot run, in one scoped place.

megatron-core 0.16's ``GatedDeltaNet`` refuses to construct without the ``fla`` package and calls two
of its Triton kernels in forward: ``l2norm`` on q and k, and ``chunk_gated_delta_rule``. fla installs
beside a CPU torch but its kernels fail there ("0 active drivers"), so on CPU both are swapped for
torch code: megatron-core's own ``torch_chunk_gated_delta_rule`` (the one its deterministic mode uses)
and an l2norm with fla's formula. Inside :func:`torch_gdn_kernels` only those three module attributes
of ``megatron.core.ssm.gated_delta_net`` change; nothing changes when CUDA and fla are both present.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """fla's ``l2norm``: x / sqrt(sum(x²) + eps) along ``dim``."""
    return x * torch.rsqrt((x * x).sum(dim=dim, keepdim=True) + eps)


@contextlib.contextmanager
def torch_gdn_kernels() -> Iterator[None]:
    from megatron.core.ssm import gated_delta_net as gdn

    if gdn.HAVE_FLA and torch.cuda.is_available():
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(gdn, "HAVE_FLA", True))
        stack.enter_context(mock.patch.object(gdn, "l2norm", l2norm, create=True))
        stack.enter_context(
            mock.patch.object(gdn, "chunk_gated_delta_rule", gdn.torch_chunk_gated_delta_rule, create=True)
        )
        yield
