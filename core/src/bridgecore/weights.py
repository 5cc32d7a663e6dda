"""Weight streaming for RL: HF (name, tensor) pairs packed into size-capped buckets.

An RL framework pushes the trained weights from Megatron to its inference engine (vLLM, SGLang) every
step. Sending one flat buffer per bucket instead of one message per tensor is what makes that fast;
:func:`buckets` packs the pairs of :meth:`bridgecore.bridge.AutoBridge.export_hf_weights` into such
buffers, and :meth:`WeightBucket.tensors` splits one back into named views on the receiving side.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

#: every tensor starts at a multiple of this many bytes, so each view of the buffer is aligned for
#: its dtype (the widest, float64 and int64, need 8)
ALIGN = 16


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in its bucket's buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class WeightBucket:
    """Tensors packed back to back (each at an aligned offset) in one 1-D ``uint8`` ``buffer``.

    ``entries`` is the metadata a receiver needs to split ``buffer`` back; :meth:`tensors` does it.
    """

    buffer: torch.Tensor
    entries: list[Entry]

    @property
    def nbytes(self) -> int:
        """The bytes in use: the end of the last tensor."""
        return self.entries[-1].offset + self.entries[-1].nbytes if self.entries else 0

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs: views of ``buffer``, no copy."""
        for e in self.entries:
            yield e.name, self.buffer[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def buckets(
    pairs: Iterable[tuple[str, torch.Tensor]],
    bucket_size: int,
    device: torch.device | str | None = None,
    reuse: bool = False,
) -> Iterator[WeightBucket]:
    """Pack ``pairs`` in order into buckets of at most ``bucket_size`` bytes each.

    A tensor larger than ``bucket_size`` travels alone in a bucket of its own size. ``device`` is
    where the buffers live (``"cpu"`` to stage them in host memory); by default the device of each
    bucket's first tensor. With ``reuse=True`` every bucket is packed into the same buffer (grown when
    a tensor needs more), so a bucket must be consumed, sent or copied, before the next is asked for;
    it saves allocating, and first-touching, a new buffer per bucket.
    """
    if bucket_size <= 0:
        raise ValueError(f"bucket_size must be positive, got {bucket_size}")
    pending: list[tuple[str, torch.Tensor]] = []
    used = 0
    kept: torch.Tensor | None = None

    def pack() -> WeightBucket:
        nonlocal kept
        where = torch.device(device) if device is not None else pending[0][1].device
        size = max(bucket_size, used)
        if reuse and kept is not None and kept.device == where and kept.numel() >= size:
            buffer = kept
        else:
            buffer = torch.empty(size, dtype=torch.uint8, device=where)
            kept = buffer if reuse else None
        entries, offset = [], 0
        for name, tensor in pending:
            nbytes = tensor.numel() * tensor.element_size()
            target = buffer[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
            target.copy_(tensor)
            entries.append(Entry(name, tensor.dtype, tuple(tensor.shape), offset, nbytes))
            offset = _aligned(offset + nbytes)
        return WeightBucket(buffer[:used], entries)

    for name, tensor in pairs:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and _aligned(used) + nbytes > bucket_size:
            yield pack()
            pending, used = [], 0
        used = _aligned(used) + nbytes
        pending.append((name, tensor))
    if pending:
        yield pack()
