"""A rank's saved chunks, described without a process group of peers or any tensor memory.

The offline executors plan a whole conversion in one process: each rank of the target layout is
simulated in turn (megatron-core's parallel state over a fake process group), its model built on
the meta device, and megatron-core's own sharded state dict says which chunk of which saved tensor
each of its params holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from bridgecore.errors import BridgeError
from bridgecore.megatron.compat import cpu_compat
from bridgecore.megatron.dcp import Region
from bridgecore.megatron.extra_state import add_extra_states
from bridgecore.megatron.parallel import Layout
from bridgecore.megatron.params import LocalTensor
from bridgecore.megatron.state import sharded_state_dict, state_key


@contextlib.contextmanager
def simulated_rank(rank: int, world: int, layout: Layout) -> Iterator[None]:
    """megatron-core's parallel state as rank ``rank`` of ``world`` sees it, with no peers.

    The fake backend answers every collective at once without data; building meta models and
    describing their sharded state dicts needs the ranks and groups, never the communication.
    """
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        ps.initialize_model_parallel(**layout.megatron_sizes(), create_gloo_process_groups=False)
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def saved_state(
    chunks: list[torch.nn.Module], key_layout: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What ``save_dist`` saves, split as megatron-core splits it: (sharded part, common part)."""
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    state: dict[str, Any] = {"checkpoint_version": 3.0, "iteration": 0}
    with cpu_compat("meta"):
        for i, chunk in enumerate(chunks):
            state[state_key(i, chunks)] = sharded_state_dict(chunk, key_layout)
        add_extra_states(state)
    return save_preprocess(state, validate_access_integrity=False)


def main_chunks(
    chunks: list[torch.nn.Module], tensors: list[LocalTensor], key_layout: dict[str, Any] | None = None
) -> tuple[list[Any], list[tuple[Any, LocalTensor, Region]], dict[str, Any]]:
    """This rank's saved objects and tensor chunks (main replicas only), each chunk with its param."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, is_main_replica

    sharded, common = saved_state(chunks, key_layout)
    # Views share their base's storage; meta storages are distinct objects even without memory.
    by_storage = {t.tensor.untyped_storage()._cdata: t for t in tensors}
    objects, views = [], []
    for item in nested_values(sharded):
        if not is_main_replica(item.replica_id):
            continue
        if isinstance(item, ShardedObject):
            objects.append(item)
            continue
        param = by_storage.get(item.data.untyped_storage()._cdata)
        if param is None or not param.tensor.is_contiguous():
            raise BridgeError(f"{item.key}: saved chunk is not a view of a contiguous model param; cannot stream it")
        data = item.data
        views.append(
            (
                item,
                param,
                Region(tuple(data.shape), data.stride(), data.storage_offset() - param.tensor.storage_offset()),
            )
        )
    return objects, views, common
