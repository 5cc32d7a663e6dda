"""Weight streaming for RL: HF (name, tensor) pairs packed into size-capped buckets.

An RL framework pushes the trained weights from Megatron to its inference engine (vLLM, SGLang) every
step. Sending one flat buffer per bucket instead of one message per tensor is what makes that fast;
:func:`buckets` packs the pairs of :func:`bridgecore.streaming.export_hf_weights` into such
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
    buffer: torch.Tensor | None = None,
) -> Iterator[WeightBucket]:
    """Pack ``pairs`` in order into buckets of at most ``bucket_size`` bytes each.

    A tensor larger than ``bucket_size`` travels alone in a bucket of its own size. ``device`` is
    where new buffers live (``"cpu"`` to stage them in host memory); by default the device of each
    bucket's first tensor. ``buffer``, a 1-D ``uint8`` tensor of at least ``bucket_size`` bytes, is
    packed with every bucket instead (on its own device): keep one across steps and each bucket must
    be consumed (sent, copied) before the next is asked for, but no step pays for new memory, whose
    first touch costs several times the copy into it (a fresh bucket costs more than the copy).
    """
    if bucket_size <= 0:
        raise ValueError(f"bucket_size must be positive, got {bucket_size}")
    if buffer is not None and (buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < bucket_size):
        raise ValueError(
            f"buffer must be a 1-D uint8 tensor of at least bucket_size ({bucket_size}) bytes,"
            f" got {buffer.dtype} {tuple(buffer.shape)}"
        )
    pending: list[tuple[str, torch.Tensor]] = []
    used = 0

    def pack() -> WeightBucket:
        if buffer is not None and used <= buffer.numel():
            target = buffer
        else:
            where = torch.device(device) if device is not None else pending[0][1].device
            target = torch.empty(used, dtype=torch.uint8, device=where)
        entries, offset = [], 0
        for name, tensor in pending:
            nbytes = tensor.numel() * tensor.element_size()
            target[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
            entries.append(Entry(name, tensor.dtype, tuple(tensor.shape), offset, nbytes))
            offset = _aligned(offset + nbytes)
        return WeightBucket(target[:used], entries)

    for name, tensor in pairs:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and _aligned(used) + nbytes > bucket_size:
            yield pack()
            pending, used = [], 0
        used = _aligned(used) + nbytes
        pending.append((name, tensor))
    if pending:
        yield pack()
