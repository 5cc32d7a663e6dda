"""One HF tensor for many Megatron params: the :class:`Broadcast` mapping kind, and its export check.

Import reads the one HF tensor into every Megatron param that holds a copy of it. Export gets one
piece per copy, on whichever ranks hold them; :class:`Copies` lets only copy 0 be written and checks,
over every rank, that all copies are still equal, so the checkpoint never silently keeps one of
several diverged values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch

from bridgecore.errors import BridgeError
from bridgecore.mapping.types import HFPiece, Mapping, Wrapper


class Broadcast(Wrapper):
    """``inner`` for every value of the Megatron capture ``over``, which the HF names lack.

    ModelOpt's one input amax shared by all experts of a layer is this kind: every
    ``local_experts.{expert}`` input quantizer reads it. The values of ``over`` must include 0: that
    copy is the one export writes.
    """

    def __init__(self, inner: Mapping, over: str = "expert"):
        if over not in inner.megatron.fields:
            raise ValueError(f"{inner}: a broadcast over {{{over}}} needs it in the Megatron pattern")
        if any(over in p.fields for p in inner.hf):
            raise ValueError(f"{inner}: the HF tensors of a broadcast over {{{over}}} carry no {{{over}}} capture")
        super().__init__(inner)
        self.over = over

    def __repr__(self) -> str:
        return f"Broadcast[{self.over}]({self.inner!r})"

    def to_hf(self, shards: list[torch.Tensor], captures: dict[str, int], *given: Any) -> list[HFPiece]:
        pieces = self.inner.to_hf(shards, captures, *given)
        for piece in pieces:
            piece.copy = (self.over, captures[self.over])
        return pieces


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()
    return f"{tensor.dtype}{list(tensor.shape)}:{hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()}"


class Copies:
    """What one exporting rank saw of broadcast tensors: which pieces to write, and each copy's digest;
    and what the mappings noted on its pieces.

    Every export path calls :meth:`keep` on each piece it would write, then :meth:`check` on what all
    ranks saw (``digests`` gathered) before the output is committed, and says :meth:`said` of the
    ``notes`` gathered.
    """

    def __init__(self) -> None:
        #: HF tensor (``name`` or ``name[expert]`` for a slab) -> (capture, value) -> digest.
        self.digests: dict[str, dict[tuple[str, int], str]] = {}
        #: what happened -> the items it happened to (:attr:`HFPiece.note`).
        self.notes: dict[str, set[str]] = {}

    def keep(self, piece: HFPiece) -> bool:
        """Whether to write ``piece``: yes unless it is a copy of a broadcast tensor other than copy 0."""
        if piece.note is not None:
            self.notes.setdefault(piece.note[0], set()).add(piece.note[1])
        if piece.copy is None:
            return True
        if not piece.tensor.is_meta:
            label = piece.name if piece.expert is None else f"{piece.name}[{piece.expert}]"
            self.digests.setdefault(label, {})[piece.copy] = _digest(piece.tensor)
        return piece.copy[1] == 0

    @staticmethod
    def check(gathered: Iterable[dict[str, dict[tuple[str, int], str]]]) -> None:
        """Every copy of each broadcast tensor equals copy 0, over the ``digests`` of every rank."""
        merged: dict[str, dict[tuple[str, int], str]] = {}
        for part in gathered:
            for name, copies in part.items():
                merged.setdefault(name, {}).update(copies)
        for name, copies in sorted(merged.items()):
            first = min(copies)
            differ = sorted(value for (_, value), digest in copies.items() if digest != copies[first])
            if differ:
                over = first[0]
                raise BridgeError(
                    f"{name}: the HF checkpoint holds one tensor for the Megatron params of every {over},"
                    f" but those of {over} {', '.join(map(str, differ))} differ from {over} {first[1]}'s;"
                    " it cannot be exported as one tensor"
                )

    @staticmethod
    def said(gathered: Iterable[dict[str, set[str]]], shown: int = 4) -> list[str]:
        """One line per distinct note over every rank's ``notes``: what happened, and to which items."""
        merged: dict[str, set[str]] = {}
        for part in gathered:
            for what, items in part.items():
                merged.setdefault(what, set()).update(items)
        lines = []
        for what, items in sorted(merged.items()):
            first = sorted(items)[:shown]
            more = f" and {len(items) - shown} more" if len(items) > shown else ""
            lines.append(f"{what}: {', '.join(first)}{more}")
        return lines
