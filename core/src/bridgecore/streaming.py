"""The weight-streaming executor: a model's HF weights, gathered over TP and EP, handed to the caller
tensor by tensor or packed into buckets (an RL loop refitting its inference engine), never written."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from bridgecore.errors import BridgeError
from bridgecore.hf.writer import parse_size
from bridgecore.mapping import Binding, Copies, HFPiece
from bridgecore.megatron import parallel
from bridgecore.megatron.params import LocalTensor
from bridgecore.plan.bridge import Bridge, Model
from bridgecore.weights import WeightBucket, buckets


def export_hf_weights(
    bridge: Bridge,
    model: Model,
    *,
    bucket_size: int | str | None = None,
    device: torch.device | str | None = None,
    buffer: torch.Tensor | None = None,
) -> Iterator[tuple[str, torch.Tensor]] | Iterator[WeightBucket]:
    """``model``'s HF (name, tensor) pairs, on every rank, gathered over TP and EP; stacked experts whole.

    With ``bucket_size`` (bytes, or a string such as ``"2GB"``) it yields
    :class:`bridgecore.weights.WeightBucket` s instead: the same tensors in the same order, packed
    into one flat buffer per bucket of at most that size (:func:`bridgecore.weights.buckets`;
    a ``buffer`` kept by the caller is packed with every bucket instead of new memory). ``device``
    is where the yielded tensors or new buffers live: ``"cpu"`` stages them in host memory; by
    default they stay on the model's device.
    For big models prefer :meth:`bridgecore.AutoBridge.save_hf_pretrained`, which never gathers beyond TP.
    """
    pairs = _hf_weight_pairs(bridge, model)
    if bucket_size is not None:
        return buckets(pairs, parse_size(bucket_size), device, buffer)
    if device is not None:
        return ((name, tensor.to(device)) for name, tensor in pairs)
    return pairs


def _hf_weight_pairs(bridge: Bridge, model: Model) -> Iterator[tuple[str, torch.Tensor]]:
    bound = parallel.collective(bridge.bind, model, None)
    pending: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    copies = Copies()
    for part in _gathered_pieces(bridge, bound):
        for piece in part:
            if not copies.keep(piece):
                continue
            if piece.expert is None:
                yield piece.name, piece.tensor
                continue
            stack = pending.setdefault(piece.name, torch.empty(piece.full_shape, dtype=piece.tensor.dtype))
            stack[piece.expert] = piece.tensor
            filled[piece.name] = filled.get(piece.name, 0) + 1
            if filled[piece.name] == piece.num_experts:
                yield piece.name, pending.pop(piece.name)
    Copies.check([copies.digests])
    if parallel.rank() == 0:
        for line in Copies.said([copies.notes]):
            print(f"note: {line}", flush=True)
    for name in bridge.conversion_for().passthrough:
        yield name, bridge.passthrough_reader.read(name, ())


def _gathered_pieces(bridge: Bridge, bound: list[tuple[LocalTensor, Binding]]) -> Iterator[list[HFPiece]]:
    """Each tensor's HF pieces as every rank sees them: gathered over TP, then shared over EP and PP."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise BridgeError("export_hf_weights gathers over TP and EP only; with PP>1 use save_hf_pretrained")
    named = {t.name: t for t, _ in bound}
    for t, b in bound:
        pieces = bridge.pieces(t, b, named)
        if not t.writer:
            pieces = []
        if t.expert and ps.get_expert_model_parallel_world_size() > 1:
            pieces = [
                p for part in parallel.all_gather_objects(pieces, ps.get_expert_model_parallel_group()) for p in part
            ]
        yield pieces
