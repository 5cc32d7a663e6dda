"""Writing torch_dist files with writer threads in this process, never forked worker processes.

megatron-core's default torch_dist save strategy writes through ``FileSystemWriterAsync``, which forks
one worker process per file and waits on a queue for each: a worker that dies before answering (it
imports psutil, which nothing declares; an OOM kill; a signal) leaves the save waiting forever. The
strategy here is megatron-core's own, down to the planner and the file layout, but hands the state
to torch's ``FileSystemWriter``, whose threads raise into the save when they fail. The files, the
``.metadata`` and ``metadata.json`` are those megatron-core writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: writer threads per rank, each writing its own ``.distcp`` file (megatron-core's default count).
THREADS = 2


def file_writer(path: Path, threads: int = THREADS) -> Any:
    """DCP's file writer, recording its path as a string as megatron-core's writer does: loaders
    (ours included) refuse a ``.metadata`` that pickles a ``PosixPath``."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        @property
        def checkpoint_id(self) -> str:
            return str(self.path)

    return Writer(path, thread_count=threads)


def threaded_save_strategy(threads: int = THREADS) -> Any:
    """megatron-core's torch_dist save strategy, writing through ``threads`` threads of this process."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import save as dcp_save

    class ThreadedSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict: Any, checkpoint_dir: str | Path) -> None:
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            dcp_save(
                mcore_to_pyt_state_dict(state, False),
                storage_writer=file_writer(Path(checkpoint_dir), self.thread_count),
                planner=MCoreSavePlanner(
                    dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False
                ),
            )

    default = get_default_save_sharded_strategy()
    return ThreadedSave(default.backend, default.version, thread_count=threads)
