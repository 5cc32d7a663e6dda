"""What megatron-core needs to build and run on a machine without CUDA, in one scoped place.

megatron-core asks ``torch.cuda.current_device()`` for the device of buffers it creates (router
expert bias, RoPE frequencies, attention masks), moves the shared embedding of the first and last
pipeline stages to CUDA, synchronizes CUDA around checkpoint writes and forks the CUDA RNG tracker
around dropout regions; its router gating (``moe_utils``) reads a Transformer-Engine symbol that is
never defined without Transformer Engine. Inside :func:`cpu_compat` the current device is the CPU
(or meta) device, synchronizing has nothing to wait for, ``Tensor.cuda()`` keeps a tensor where it
is, the RNG fork is a no-op (conversion draws no random numbers) and the symbol is defined as
absent. Nothing is patched outside the ``with`` block, and nothing at all when CUDA is available.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch


@contextlib.contextmanager
def cpu_compat(device: str = "cpu") -> Iterator[None]:
    """Scope in which megatron-core builds and runs without CUDA; ``device="meta"`` builds
    without memory (for ``bridgecore inspect`` and planning)."""
    if torch.cuda.is_available() and device != "meta":
        yield
        return
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker
    from megatron.core.transformer.moe import moe_utils

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("torch.cuda.current_device", lambda: torch.device(device)))
        stack.enter_context(mock.patch("torch.cuda.synchronize", lambda device=None: None))
        # With PP>1 and tied embeddings or MTP, megatron moves the embedding to CUDA to all-reduce
        # it between the first and last stage; gloo reduces it where it is.
        stack.enter_context(mock.patch.object(torch.Tensor, "cuda", lambda self, *args, **kwargs: self))
        stack.enter_context(
            mock.patch.object(CudaRNGStatesTracker, "fork", lambda self, name=None: contextlib.nullcontext())
        )
        stack.enter_context(mock.patch.object(moe_utils, "te_general_gemm", None, create=True))
        if device == "meta":
            stack.enter_context(torch.device("meta"))
        yield


@contextlib.contextmanager
def deferred_compile() -> Iterator[None]:
    """Scope in which ``torch.compile(fn, **options)`` returns a stand-in that compiles ``fn`` with the
    same options on its first call.

    torch compiles on the first call anyway; what the stand-in defers is the import of dynamo and
    inductor that ``torch.compile`` does when it wraps a function, which megatron-core does to its
    fusions at import (through ``megatron.core.jit.jit_fuser``) and which a conversion never calls.
    """
    real = torch.compile

    def compile_later(model: Callable[..., Any] | None = None, **options: Any) -> Any:
        if model is None:  # used as @torch.compile(**options)
            return functools.partial(compile_later, **options)
        compiled: Callable[..., Any] | None = None

        @functools.wraps(model)
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **options)
            return compiled(*args, **kwargs)

        return call

    with mock.patch.object(torch, "compile", compile_later):
        yield


def import_megatron_core() -> None:
    """Import megatron-core with its fusions' compilation deferred to their first call
    (:func:`deferred_compile`), unless something imported it already.

    For the ``bridgecore`` command, which owns its process: megatron-core's ``jit_fuser`` keeps the
    stand-in for the fusions its modules define later too. Library users import megatron-core
    themselves and keep its behaviour unchanged.
    """
    if "megatron.core" in sys.modules:
        return
    with deferred_compile():
        import megatron.core  # noqa: F401
