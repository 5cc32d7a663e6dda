"""Offline conversion between HF and torch_dist checkpoints in one process, never building the model.

A torch_dist checkpoint is a set of chunks: each saved ShardedTensor of each rank is a region of a
global tensor. Both directions work from megatron-core's own description of those chunks, taken
from models built on the meta device (shapes only), and move one tensor through memory at a time:

- import: the sharded state dict of every rank of the target layout is taken in this process,
  each rank simulated in turn by a fake process group (no communication, no memory). The chunks
  are handed to ``torch.distributed.checkpoint.save`` with a planner whose ``resolve_data`` makes
  each chunk's tensor only when the writer asks for it: read the HF slices of that rank's param
  through its mapping, then take the region of the param the chunk covers. The files are chunked
  as that layout's ranks would have saved them, so loading at that layout reads no extra bytes.
- export: a meta model at TP=PP=EP=1 says which regions of which saved tensors form each whole
  Megatron param; those regions are read straight from the ``.distcp`` files (whatever layout saved
  them), the mapping turns the param into HF tensors, and the core's ``ShardedWriter`` writes them.

Under ``torchrun`` (on one node or several sharing a file system) the processes split the work: each
plans the whole conversion alone (the fake process group again), then they join torchrun's group,
each makes and writes its own share (whole params, balanced by bytes) into one temporary directory,
and rank 0 commits the result once every share is written. The files are those one process writes,
but for the torch_dist files' names (one set per process).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bridgecore.casting import exact_cast
from bridgecore.errors import BridgeError
from bridgecore.hf.writer import ShardedWriter, check_target, parse_size
from bridgecore.mapping import Binding, Copies
from bridgecore.megatron import checkpoint, parallel, training
from bridgecore.megatron.chunks import main_chunks, simulated_rank
from bridgecore.megatron.dcp import COMMON_FILE, COMMON_STATE, RELEASE, Region, SavedChunks, common_in_shards
from bridgecore.megatron.parallel import Layout
from bridgecore.megatron.params import LocalTensor, local_tensors
from bridgecore.megatron.save import file_writer
from bridgecore.megatron.state import exact_storage
from bridgecore.plan.bridge import Bridge
from bridgecore.progress import Progress, track

ChunkId = tuple[str, tuple[int, ...]]
#: params the offline export reads ahead of the one it writes.
READ_AHEAD = 1


@dataclass(frozen=True)
class _Recipe:
    """How to make one saved chunk: the rank-local param it views, its mapping, and the region."""

    param: LocalTensor
    binding: Binding
    region: Region


def _require_no_process_group(what: str) -> None:
    if dist.is_initialized():
        raise BridgeError(
            f"{what} plans the conversion with a process group of its own before it joins torchrun's;"
            " call it in a process that has not joined a process group yet"
        )


# -- import ------------------------------------------------------------------------------------
def stream_to_megatron(
    bridge: Bridge,
    out_dir: str | Path,
    layout: Layout | None = None,
    *,
    allow_unmapped: Sequence[str] = (),
    overwrite: bool = False,
    threads: int = 2,
) -> Path:
    """Write ``bridge``'s HF checkpoint as a torch_dist checkpoint chunked for ``layout``.

    One process, one param (of one rank) in memory at a time; the model is never built. ``threads``
    writer threads each make and write their own chunks.
    """
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import (
        get_default_save_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies.torch import (
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import save as dcp_save

    out_dir = Path(out_dir)
    check_target(out_dir, overwrite)
    _require_no_process_group("offline import")
    if bridge.reader is None:
        raise BridgeError("offline import needs the HF weights; this bridge was made from a config only")
    plan = bridge.plan_conversion(layout, allow_unmapped)
    layout = plan.layout
    recipes, saved, common = {}, {}, None
    names: set[str] = set()
    world = layout.pp * math.lcm(layout.tp, layout.ep * layout.etp)
    for rank in range(world):
        with simulated_rank(rank, world, layout):
            chunks = bridge.build_chunks(layout, meta=True)
            tensors = [t for t in local_tensors(chunks, bridge.config) if not bridge.embedding_copy(t)]
            names.update(t.name for t in tensors)
            objects, views, rank_common = main_chunks(chunks, tensors)
            common = common if common is not None else rank_common
            for obj in objects:
                saved.setdefault(obj.unique_key, [obj])
            for item, param, region in views:
                chunk_id = (item.key, tuple(item.global_offset))
                if chunk_id in recipes:
                    continue
                binding = plan.table.find(param.name)
                if binding is None:
                    raise BridgeError(f"{param.name}: saved as {item.key} but no mapping fills it")
                recipes[chunk_id] = _Recipe(param, binding, region)
                saved.setdefault(item.key, []).append(item)
    plan.cover(sorted(names), bridge.hf_keys)
    bridge.waived = plan.waived
    if common_in_shards():  # where the installed megatron-core's own save puts it
        state = ShardedObject(COMMON_STATE, common, (1,), (0,), replica_id=0)
        saved[state.unique_key] = [state]

    with _processes() as (rank, procs):
        # whole params per process: the chunks of one param are made from one read of it
        params: dict[tuple[str, int], list[ChunkId]] = {}
        for chunk_id, recipe in recipes.items():
            params.setdefault(_StreamingSavePlanner._param_id(recipe), []).append(chunk_id)
        sizes = {p: recipes[ids[0]].param.tensor.nbytes for p, ids in params.items()}
        mine = {c for p in _share(sizes, procs)[rank] for c in params[p]}
        with checkpoint.staged_release(out_dir) as temp:  # the others write into it once rank 0 made it
            progress = Progress("offline import", len(mine), "chunk", enabled=rank == 0)
            # megatron's conversion asks for the rank: a simulated one, or this process's in torchrun's group
            with simulated_rank(0, 1, Layout()) if procs == 1 else contextlib.nullcontext(), progress:
                state = mcore_to_pyt_state_dict(_share_of(saved, mine, rank), False)
                planner = _StreamingSavePlanner(bridge, {c: recipes[c] for c in mine}, progress)
                dcp_save(
                    state,
                    storage_writer=file_writer(temp / RELEASE, threads),
                    planner=planner,
                    no_dist=procs == 1,
                )

            def finish() -> None:
                if rank != 0:
                    return
                strategy = get_default_save_sharded_strategy()
                save_config(CheckpointingConfig(strategy.backend, strategy.version), str(temp / RELEASE))
                if not common_in_shards():
                    torch.save(common, temp / RELEASE / COMMON_FILE)
                plan.keep_beside(temp)
                checkpoint.publish(temp, out_dir, bridge.megatron_meta(), bridge.hf_dir, overwrite)

            parallel.collective(finish)
    return out_dir


@contextlib.contextmanager
def _processes() -> Iterator[tuple[int, int]]:
    """(this process's rank, how many processes share the work): torchrun's group, joined for the
    work and left after it, or (0, 1) when run alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield 0, 1
        return
    parallel.init_distributed()
    try:
        yield parallel.rank(), parallel.world_size()
    except BaseException:
        parallel.forget()  # without the final barrier: the other processes may be gone
        raise
    parallel.leave()


def _share(sizes: dict[Any, int], procs: int) -> list[list[Any]]:
    """``sizes``' keys split into ``procs`` parts of about equal bytes: the largest first, each onto the
    lightest part so far (ties to the lower rank); the same on every process."""
    parts: list[list[Any]] = [[] for _ in range(procs)]
    loads = [0] * procs
    for key in sorted(sizes, key=lambda k: (-sizes[k], str(k))):
        lightest = loads.index(min(loads))
        parts[lightest].append(key)
        loads[lightest] += sizes[key]
    return parts


def _share_of(saved: dict[str, list[Any]], mine: set[ChunkId], rank: int) -> dict[str, list[Any]]:
    """The saved items this process writes: its chunks, and the saved objects on rank 0."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    out: dict[str, list[Any]] = {}
    for key, items in saved.items():
        kept = [
            i for i in items if (rank == 0 if isinstance(i, ShardedObject) else (i.key, tuple(i.global_offset)) in mine)
        ]
        if kept:
            out[key] = kept
    return out


def _planner_base() -> type:
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    return MCoreSavePlanner


class _StreamingSavePlanner(_planner_base()):
    """A DCP save planner whose tensors are made from the HF checkpoint when the writer asks.

    Chunks of one param (the gate and up halves of a gated fc1) are asked for one after the other;
    the param is kept until its last chunk is resolved, so each is read from HF once.
    """

    def __init__(self, bridge: Bridge, recipes: dict[ChunkId, _Recipe], progress: Progress):
        super().__init__(flatten_state_dict=False)
        self.bridge, self.recipes, self.progress = bridge, recipes, progress
        self._uses = Counter(self._param_id(r) for r in recipes.values())
        self._made: dict[tuple[str, int], torch.Tensor] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _param_id(recipe: _Recipe) -> tuple[str, int]:
        return recipe.param.name, recipe.param.shard.rank

    def lookup_object(self, index: Any) -> Any:
        recipe = None if index.offset is None else self.recipes.get((index.fqn, tuple(index.offset)))
        if recipe is None:  # a saved object (bytes), not a tensor chunk
            return super().lookup_object(index)
        chunk = super().lookup_object(index)
        made = exact_storage(recipe.region.of(self._param(recipe)).reshape(chunk.shape))
        self.progress.update()
        return made

    def _param(self, recipe: _Recipe) -> torch.Tensor:
        key = self._param_id(recipe)
        with self._lock:
            value = self._made.get(key)
            if value is None:
                value = self._make(recipe)
            self._uses[key] -= 1
            if self._uses[key]:
                self._made[key] = value
            else:
                self._made.pop(key, None)
        return value

    def _make(self, recipe: _Recipe) -> torch.Tensor:
        t, b = recipe.param, recipe.binding
        value = b.mapping.to_megatron(self.bridge.reader, b.capture_dict, t.shard)
        if tuple(value.shape) != tuple(t.tensor.shape):
            raise BridgeError(
                f"{t.name}: {b.mapping!r} made shape {list(value.shape)} from {', '.join(b.hf)},"
                f" but the Megatron tensor has {list(t.tensor.shape)}"
            )
        return exact_cast(value, t.tensor.dtype, t.name).contiguous()


# -- export ------------------------------------------------------------------------------------
def stream_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    plugin: str | None = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    hf_config: str | Path | None = None,
    iteration: int | None = None,
) -> Path:
    """Write the HF checkpoint of a torch_dist checkpoint (saved at any layout), one param at a time;
    ``max_shard_size`` as :meth:`Bridge.save_hf_pretrained` takes it.

    Without ``hf_config`` the checkpoint is one ``bridgecore import`` wrote; with it, any Megatron
    checkpoint of that model (a training run's ``iteration``, default the tracker's), read for its
    model weights only."""
    _require_no_process_group("offline export")
    if hf_config is not None:
        bridge = Bridge.from_training_run(hf_config, ckpt_dir, iteration, plugin=plugin)
    else:
        bridge = Bridge.from_megatron_checkpoint(ckpt_dir, plugin=plugin)
    out_dir = Path(out_dir)
    check_target(out_dir, overwrite)
    release = training.torch_dist_dir(ckpt_dir, iteration)
    saved = SavedChunks(release, training.saved_metadata(release))
    conversion = bridge.plan_conversion(Layout())
    with simulated_rank(0, 1, Layout()):
        chunks = bridge.build_chunks(Layout(), meta=True)
        bound = bridge.bind(chunks, None)
        plan = bridge.export_entries(bound)
        key_layout = training.key_layout(chunks, saved.metadata)
        _, views, _ = main_chunks(chunks, [t for t, _ in bound], key_layout)
    training.check_model_keys(bridge.config, [item for item, _, _ in views], saved.metadata, str(release))
    regions: dict[str, list[tuple[Any, Region]]] = {}
    for item, param, region in views:
        regions.setdefault(param.name, []).append((item, region))
    buffers = _Buffers(max((t.tensor.nbytes for t, _ in bound), default=0))
    size = None if max_shard_size is None else parse_size(max_shard_size)

    named = {t.name: t for t, _ in bound}

    def whole(name: str) -> torch.Tensor | None:
        t = named.get(name)
        if t is None:
            return None
        value = torch.empty(t.tensor.shape, dtype=t.tensor.dtype)
        saved.read_param(name, regions.get(name, []), value)
        return value

    def read(pair: tuple[LocalTensor, Binding]) -> tuple[torch.Tensor, list[torch.Tensor | None] | None]:
        """The param's value, and (when its mapping needs others beside it) theirs, whole."""
        t, b = pair
        value = buffers.take(t.tensor.shape, t.tensor.dtype)
        saved.read_param(t.name, regions.get(t.name, []), value)
        needs = b.mapping.needs(b.capture_dict)
        return value, [whole(n) for n in needs] if needs else None

    with _processes() as (rank, procs):
        order = {t.name: i for i, (t, _) in enumerate(bound)}
        share = _share({t.name: t.tensor.nbytes for t, _ in bound}, procs)[rank]
        mine = [bound[i] for i in sorted(order[name] for name in share)]

        def write(writer: ShardedWriter, copies: Copies) -> None:
            progress = track(_read_ahead(mine, read), "offline export", "param", total=len(mine), enabled=rank == 0)
            for (_, b), (value, given) in progress:
                for piece in bridge.hf_pieces(b, [value], given, value.dtype):
                    if copies.keep(piece):
                        writer.write(piece.name, piece.tensor, expert=piece.expert)
                buffers.give(value)

        try:
            conversion.write_hf(out_dir, plan, size, write, overwrite)
        finally:
            saved.close()
    return out_dir


class _Buffers:
    """Byte buffers, each as large as the largest param, handed out again once given back.

    Memory a process touches for the first time costs a page fault per page, which on a VM costs
    more than copying into it; the export reads every param into one of a few such buffers.
    """

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            buffer = self._free.pop() if self._free else None
        if buffer is None:
            buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        nbytes = math.prod(shape) * dtype.itemsize
        return buffer[:nbytes].view(dtype).view(shape)

    def give(self, value: torch.Tensor) -> None:
        """Return the buffer under ``value``; nothing may use ``value`` afterwards."""
        buffer = torch.empty(0, dtype=torch.uint8).set_(value.untyped_storage())
        with self._lock:
            self._free.append(buffer)


def _read_ahead(items: Sequence[Any], read: Callable[[Any], Any], depth: int = READ_AHEAD) -> Iterator[tuple[Any, Any]]:
    """``(item, read(item))`` in order, a background thread reading up to ``depth`` items ahead, so
    reading the next param overlaps converting and writing this one (file reads release the GIL).
    At most ``depth + 1`` read results are alive once the caller is done with each before asking for
    the next: the one it is given and those being read."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bridgecore-read") as pool:
        pending: deque[tuple[Any, Future]] = deque()
        upcoming = iter(items)
        for item in itertools.islice(upcoming, depth):
            pending.append((item, pool.submit(read, item)))
        while pending:
            item, future = pending.popleft()
            value = future.result()
            following = next(upcoming, None)
            if following is not None:
                pending.append((following, pool.submit(read, following)))
            yield item, value
