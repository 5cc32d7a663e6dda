"""Process groups: gloo over CPU for one process or under torchrun, then megatron-core's parallel state."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
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

    def megatron_sizes(self) -> dict[str, int | None]:
        """The sizes under megatron-core's names, as ``initialize_model_parallel`` and its config take them."""
        return {
            "tensor_model_parallel_size": self.tp,
            "pipeline_model_parallel_size": self.pp,
            "virtual_pipeline_model_parallel_size": self.vpp,
            "expert_model_parallel_size": self.ep,
            "expert_tensor_parallel_size": self.etp,
        }


#: the config values each parallel size must divide: a split that is not even cannot be exact.
#: A family adds its own through ``ModelConfig.parallel_splits`` (per-layer-type heads, ...).
_SPLIT_BY = {
    "tp": (
        "num_attention_heads",
        "num_query_groups",
        "ffn_hidden_size",
        "vocab_size",
        "moe_shared_expert_intermediate_size",
        "linear_num_key_heads",
        "linear_num_value_heads",
    ),
    "ep": ("num_moe_experts",),
    "etp": ("moe_ffn_hidden_size",),
}


def _split_sizes(config: Any) -> dict[str, dict[str, int]]:
    """Per flag, the config values (name -> value) it must divide; values a model does not have are left out."""
    sizes = {
        flag: {n: v for n in names if isinstance(v := getattr(config, n, None), int) and not isinstance(v, bool)}
        for flag, names in _SPLIT_BY.items()
    }
    for flag, values in getattr(config, "parallel_splits", dict)().items():
        sizes.setdefault(flag, {}).update(values)
    return sizes


def _pipeline_layers(config: Any, layout: Layout) -> None:
    """Megatron-core's even pipeline split: every PP rank, and each of its VPP chunks, gets the same
    number of decoder layers (the embedding and loss count as one when the config says so). MTP
    layers sit on the last stage, outside this split."""
    layers = config.num_layers
    counted = "num_layers"
    for flag, what in (
        ("account_for_embedding_in_pipeline_split", "embedding"),
        ("account_for_loss_in_pipeline_split", "loss"),
    ):
        if getattr(config, flag, False):
            layers += 1
            counted += f" + 1 ({what})"
    if layers % layout.pp:
        raise BridgeError(
            f"--pp {layout.pp}: {counted} = {layers} does not divide by {layout.pp};"
            f" expected a --pp that divides {layers} (the decoder layers are split evenly over the stages)"
        )
    if layout.vpp is None:
        return
    if layout.pp == 1:
        raise BridgeError(f"--vpp {layout.vpp}: virtual pipeline stages need --pp 2 or more")
    per_rank = layers // layout.pp
    if per_rank % layout.vpp:
        raise BridgeError(
            f"--vpp {layout.vpp}: the {per_rank} layers of each of the {layout.pp} pipeline ranks do not divide"
            f" by {layout.vpp}; expected a --vpp that divides {per_rank}"
        )


def check_divisible(config: Any, layout: Layout) -> None:
    """Refuse a layout that does not split the model evenly, before any process group or tensor exists.

    The one layout check of every path (in memory, offline, under torchrun): each size must be
    positive, TP must divide the attention heads and groups, FFN, vocab and the family's other
    TP-split sizes, PP (and VPP) the decoder layers, EP the experts, ETP the expert FFN.
    """
    for flag in ("tp", "pp", "ep", "etp", "vpp"):
        size = getattr(layout, flag)
        if (size is not None or flag != "vpp") and (not isinstance(size, int) or size < 1):
            raise BridgeError(f"--{flag} {size}: expected a positive integer")
    for flag, values in _split_sizes(config).items():
        size = getattr(layout, flag)
        for name, value in values.items():
            if size > 1 and value % size:
                listed = ", ".join(f"{n} {v}" for n, v in values.items())
                raise BridgeError(
                    f"--{flag} {size}: {name} {value} does not divide by {size};"
                    f" expected a --{flag} that divides {listed}"
                )
    if not getattr(config, "num_moe_experts", None) and (layout.ep > 1 or layout.etp > 1):
        flag = "ep" if layout.ep > 1 else "etp"
        raise BridgeError(f"--{flag} {getattr(layout, flag)}: this model has no experts to split; expected --{flag} 1")
    _pipeline_layers(config, layout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: seconds a rank waits for the others in one collective (``BRIDGECORE_TIMEOUT`` overrides it).
DEFAULT_TIMEOUT = 1800


def timeout_seconds() -> int:
    """How long a collective may wait for the other ranks: ``BRIDGECORE_TIMEOUT`` or the default."""
    value = os.environ.get("BRIDGECORE_TIMEOUT", str(DEFAULT_TIMEOUT))
    if not value.isdigit() or int(value) <= 0:
        raise BridgeError(f"BRIDGECORE_TIMEOUT={value!r}: expected a positive number of seconds")
    return int(value)


def init_distributed() -> None:
    """Join torchrun's process group, or make a one-process group when run directly; either way a
    collective that waits longer than :func:`timeout_seconds` for another rank fails instead of hanging."""
    if dist.is_initialized():
        return
    timeout = timedelta(seconds=timeout_seconds())
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        dist.init_process_group("gloo", timeout=timeout)
    else:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout
        )


#: the store key under which the first rank to fail leaves its error for the others.
_FIRST_ERROR = "bridgecore/first_error"


def _store() -> Any:
    """The process group's key-value store (torchrun's agent keeps it, so it outlives any rank)."""
    from torch.distributed import distributed_c10d

    try:
        return distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


def publish_error(message: str) -> None:
    """Leave ``message`` as this run's first error for the other ranks, unless one is there already."""
    store = _store() if world_size() > 1 else None
    if store is None:
        return
    with contextlib.suppress(RuntimeError):
        store.compare_set(_FIRST_ERROR, "", f"rank {rank()}: {message}")


def first_error() -> str | None:
    """The first error any rank of this run published, or None."""
    store = _store() if world_size() > 1 else None
    if store is None:
        return None
    try:
        return store.get(_FIRST_ERROR).decode() if store.check([_FIRST_ERROR]) else None
    except RuntimeError:  # the store went with torchrun
        return None


@contextmanager
def _peers_answer(what: str) -> Iterator[None]:
    """A collective that fails because another rank died or hangs, as one line: the error the first
    failing rank published, else one naming this rank and the wait."""
    try:
        yield
    except RuntimeError as err:
        raise peer_failure(what, err) from None


def peer_failure(what: str, err: BaseException) -> BridgeError:
    """The one line for a collective that failed because another rank died or hangs: the error the
    first failing rank published, else one naming this rank and the wait."""
    found = first_error()
    if found:
        return BridgeError(found)
    detail = " ".join(str(err).split())[:200]
    return BridgeError(
        f"rank {rank()}: {what} with the other ranks failed ({detail}); another rank died or did not answer"
        f" within {timeout_seconds()} s (torchrun's report names it; BRIDGECORE_TIMEOUT sets the wait)"
    )


def first_cause(exc: BaseException) -> BaseException:
    """``exc``, or the first rank's exception a torch.distributed.checkpoint ``CheckpointException`` holds."""
    failures = getattr(exc, "failures", None)
    return next(iter(failures.values()))[0] if failures else exc


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` (or the first failure a checkpoint exception holds) is a collective that lost a peer."""
    cause = first_cause(exc)
    text = str(cause)
    return isinstance(cause, RuntimeError) and any(
        mark in text for mark in ("Connection closed by peer", "Connection reset by peer", "gloo", "Timed out waiting")
    )


def leave() -> None:
    """Leave the process group with every rank, and forget megatron-core's parallel state with it, so a
    later conversion in this process starts afresh. Left to the interpreter's exit, gloo's threads can
    abort the process ("terminate called without an active exception") after a successful torchrun."""
    if not dist.is_initialized():
        return
    with _peers_answer("the final barrier"):
        dist.barrier()
    forget()


def forget() -> None:
    """Drop this process's group and megatron-core's parallel state without waiting for the other ranks:
    after a failure, when they may be gone. A later conversion in this process then starts afresh."""
    if "megatron.core.parallel_state" in sys.modules:  # set up by init_model_parallel; not imported for nothing
        sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def init_model_parallel(layout: Layout) -> None:
    """(Re)initialise megatron-core's parallel state for ``layout`` over the current world."""
    from megatron.core import parallel_state

    init_distributed()
    world = dist.get_world_size()
    if world % (layout.tp * layout.pp) or world % (layout.etp * layout.ep * layout.pp):
        need = math.lcm(layout.tp * layout.pp, layout.etp * layout.ep * layout.pp)
        hint = (
            f"; run it under `torchrun --nproc-per-node {need} -m bridgecore ...`, or for import and export"
            " use --offline (one process, any layout)"
            if world == 1
            else ""
        )
        raise BridgeError(
            f"{layout} does not fit a world of {world} processes: it must be a multiple of TP×PP"
            f" ({layout.tp * layout.pp}) and of ETP×EP×PP ({layout.etp * layout.ep * layout.pp}){hint}"
        )
    if parallel_state.model_parallel_is_initialized():
        groups = _groups_of(parallel_state)
        parallel_state.destroy_model_parallel()
        # megatron-core only forgets its groups; each left alive keeps about half a MiB per re-init.
        for group in groups:
            if group in dist.distributed_c10d._world.pg_map:  # destroying one group can take its aliases along
                dist.destroy_process_group(group)
    parallel_state.initialize_model_parallel(**layout.megatron_sizes())


def _groups_of(parallel_state: Any) -> list[dist.ProcessGroup]:
    """The process groups megatron-core's parallel state holds (alone, in lists or in dicts), but WORLD."""
    found: dict[int, dist.ProcessGroup] = {}

    def visit(value: Any) -> None:
        if isinstance(value, dist.ProcessGroup):
            found[id(value)] = value
        elif isinstance(value, list | tuple):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    for value in vars(parallel_state).values():
        visit(value)
    return [g for g in found.values() if g is not dist.group.WORLD]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    with _peers_answer("gathering results"):
        dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if world_size() == 1:
        return obj
    box = [obj]
    with _peers_answer(f"receiving from rank {src}"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def collective(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on every rank; if any rank fails, every rank fails with the first rank's error.

    A failing rank publishes its error and raises at once, without waiting for the others: ``fn`` may
    hold collectives of its own (megatron-core's save), inside which the other ranks would wait for
    it until the timeout. They fail as soon as it leaves the process group (:func:`forget`, which the
    CLI calls on any error before it exits) and then raise the published error, which names the rank;
    a rank that stays in the group leaves them waiting until ``BRIDGECORE_TIMEOUT``.
    """
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:
        if world_size() > 1 and lost_peer(exc):
            raise peer_failure("a collective", exc) from exc
        if world_size() > 1:
            publish_error(str(exc) if isinstance(exc, BridgeError) else f"{type(exc).__name__}: {exc}")
            found = first_error()
            if found and not found.startswith(f"rank {rank()}: "):
                raise BridgeError(found) from exc
        raise
    # The gather tells a rank whose peer failed before reaching this point (without leaving the group).
    failures = [m for m in all_gather_objects(first_error()) if m]
    if failures:
        raise BridgeError(failures[0])
    return result
