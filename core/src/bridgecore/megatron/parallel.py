"""Process groups: gloo over CPU for one process or under torchrun, then megatron-core's parallel state."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from bridgecore.errors import BridgeError


@dataclass(frozen=True)
class Layout:
    """Model parallel sizes. ``etp`` (expert tensor parallel) defaults to 1, the usual MoE setting."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    vpp: int | None = None

    def __str__(self) -> str:
        vpp = f" VPP={self.vpp}" if self.vpp else ""
        return f"TP={self.tp} PP={self.pp} EP={self.ep} ETP={self.etp}{vpp}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join torchrun's process group, or make a one-process group when run directly."""
    if dist.is_initialized():
        return
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)


def init_model_parallel(layout: Layout) -> None:
    """(Re)initialise megatron-core's parallel state for ``layout`` over the current world."""
    from megatron.core import parallel_state

    init_distributed()
    world = dist.get_world_size()
    if world % (layout.tp * layout.pp) or world % (layout.etp * layout.ep * layout.pp):
        raise BridgeError(
            f"{layout} does not fit a world of {world} processes: it must be a multiple of TP×PP"
            f" ({layout.tp * layout.pp}) and of ETP×EP×PP ({layout.etp * layout.ep * layout.pp})"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def collective(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on every rank; if any rank fails, every rank fails.

    A rank that failed alone would otherwise leave the others waiting in the next collective. The
    failing rank re-raises its own exception; the others raise a BridgeError naming it.
    """
    error: BaseException | None = None
    result = None
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    message = None if error is None else (str(error) if isinstance(error, BridgeError) else f"{type(error).__name__}: {error}")
    failures = [(r, m) for r, m in enumerate(all_gather_objects(message)) if m]
    if error is not None:
        raise error
    if failures:
        r, m = failures[0]
        raise BridgeError(m if world_size() == 1 else f"rank {r}: {m}")
    return result
