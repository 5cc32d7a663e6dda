"""What megatron-core needs to build and run on a machine without CUDA, in one scoped place.

megatron-core 0.16 asks ``torch.cuda.current_device()`` for the device of buffers it creates
(router expert bias, RoPE frequencies, attention masks) and forks the CUDA RNG tracker around
dropout regions; its router gating (``moe_utils``) reads a Transformer-Engine symbol that is never
defined without Transformer Engine. Inside :func:`cpu_compat` the first answers the CPU device, the second is a
no-op (conversion draws no random numbers) and the third is defined as absent. Nothing is patched outside the ``with`` block, and
nothing is patched at all when CUDA is available.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch


@contextlib.contextmanager
def cpu_compat() -> Iterator[None]:
    if torch.cuda.is_available():
        yield
        return
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker
    from megatron.core.transformer.moe import moe_utils

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("torch.cuda.current_device", lambda: torch.device("cpu")))
        stack.enter_context(mock.patch.object(CudaRNGStatesTracker, "fork", lambda self, name=None: contextlib.nullcontext()))
        stack.enter_context(mock.patch.object(moe_utils, "te_general_gemm", None, create=True))
        yield
