"""A model chunk's sharded state as megatron-core saves it, and the storage rule DCP's writers need."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def state_key(index: int, chunks: list[torch.nn.Module]) -> str:
    # Megatron-LM names the model "model", or "model0", "model1", ... with virtual pipeline stages.
    return "model" if len(chunks) == 1 else f"model{index}"


def sharded_state_dict(chunk: torch.nn.Module, key_layout: dict[str, Any] | None = None) -> dict[str, Any]:
    """The chunk's sharded state dict; megatron-core needs the DP group named when MTP sits on a
    later pipeline stage than the embedding (it ties the stage's embedding copy over it).

    ``key_layout`` adds megatron-core's sharded-state-dict flags that change the saved keys
    (``non_homogeneous_layers``, ``singleton_local_shards``), to load a checkpoint saved with them."""
    from megatron.core import parallel_state as ps

    with unused_output_weights_hidden(chunk):
        return chunk.sharded_state_dict(
            metadata={"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True), **(key_layout or {})}
        )


@contextlib.contextmanager
def unused_output_weights_hidden(chunk: torch.nn.Module) -> Iterator[None]:
    """Hide the output layer weight of an MTP stage that ties it to the embedding but is not the first.

    That stage computes logits with its embedding copy, yet megatron-core (0.16 to 0.19) allocates an
    output layer weight there too, and then asserts it is absent from the sharded state dict: the
    weight is never read, so it is left out of the checkpoint, as megatron-core intends.
    """
    hidden = [
        module.output_layer
        for module in chunk.modules()
        if getattr(module, "share_embeddings_and_output_weights", False)
        and getattr(module, "mtp_process", False)
        and not module.pre_process
        and module.post_process
        and getattr(module.output_layer, "weight", None) is not None
    ]
    weights = [layer._parameters["weight"] for layer in hidden]
    for layer in hidden:
        layer._parameters["weight"] = None
    try:
        yield
    finally:
        for layer, weight in zip(hidden, weights, strict=True):
            layer._parameters["weight"] = weight


def exact_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` over a storage of exactly its bytes, sharing them. DCP's writers copy a tensor whose
    storage is larger (they would save all of it): a view of one half of a fused param, or of a
    larger read of the HF file, is such a tensor. A non-contiguous tensor is left to that copy."""
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    start = tensor.storage_offset() * tensor.element_size()
    storage = tensor.untyped_storage()[start : start + tensor.nbytes]
    return torch.empty(0, dtype=tensor.dtype).set_(storage, 0, tensor.shape)
