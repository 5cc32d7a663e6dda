"""Writing torch_dist files with writer threads in this process, never forked worker processes.

megatron-core's default torch_dist save strategy writes through ``FileSystemWriterAsync``, which forks
one worker process per file and waits on a queue for each: a worker that dies before answering (it
imports psutil, which nothing declares; an OOM kill; a signal) leaves the save waiting forever. The
strategy here is megatron-core's own, down to the planner and the file layout, but hands the state
to torch's ``FileSystemWriter``, whose threads raise into the save when they fail. The files, the
``.metadata`` and ``metadata.json`` are those megatron-core writes.
"""

from __future__ import annotations

import resource
import shutil
import threading
from pathlib import Path
from typing import Any

from bridgecore.errors import BridgeError
from bridgecore.megatron.parallel import first_cause, lost_peer

#: how DCP's extra writer threads are named (after their target function).
_WRITER_THREAD = "(_write_files_from_queue)"
#: writer threads per rank, each writing its own ``.distcp`` file (megatron-core's default count).
THREADS = 2


def file_writer(path: Path, threads: int = THREADS) -> Any:
    """DCP's file writer, recording its path as a string as megatron-core's writer does: loaders
    (ours included) refuse a ``.metadata`` that pickles a ``PosixPath``.

    DCP's extra writer threads drop what they raise (torch prints it and writes a ``.metadata``
    without their files' chunks); this writer raises it instead, and refuses any write that did not
    account for every planned item."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        @property
        def checkpoint_id(self) -> str:
            return str(self.path)

        def write_data(self, plan: Any, planner: Any) -> Any:
            failures: list[BaseException] = []
            previous = threading.excepthook

            def record(args: Any) -> None:
                if args.thread is not None and args.thread.name.endswith(_WRITER_THREAD):
                    failures.append(args.exc_value)
                else:
                    previous(args)

            threading.excepthook = record
            try:
                written = super().write_data(plan, planner)
            finally:
                # When this thread's own share failed, the others may still be writing theirs.
                for thread in threading.enumerate():
                    if thread.name.endswith(_WRITER_THREAD) and thread is not threading.current_thread():
                        thread.join()
                threading.excepthook = previous
            if failures:
                raise failures[0]
            if len(written.value()) != len(plan.items):
                raise BridgeError(
                    f"{self.path}: the writer threads wrote {len(written.value())} of {len(plan.items)} planned items"
                )
            return written

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


#: what torch.save's C++ stream writer says when the file system refuses a write (a full disk, a
#: quota, a file size limit): it reports no OSError, only a stream state or a position it did not reach.
_STREAM_REFUSALS = ("basic_ios::clear", "unexpected pos", "file write failed", "failed writing file")


def write_error(exc: BaseException, out_dir: Path) -> BaseException | None:
    """What to raise for a failed torch_dist write: a one-line error, the interruption itself (Ctrl-C,
    SIGTERM), or None when ``exc`` is no write failure. Call it before the temporary output is removed:
    the free space it reports is what the write met.

    DCP reports what its writer threads raised (a lossy cast, a shape mismatch, a full disk) or an
    interruption while it waited wrapped in a ``CheckpointException`` holding each rank's exception and
    traceback; the first one is the cause.
    """
    cause = first_cause(exc)
    if isinstance(cause, BridgeError) or not isinstance(cause, Exception):
        return cause
    if lost_peer(exc):  # not this rank's write: parallel.collective names the rank that failed
        return None
    refused = isinstance(cause, RuntimeError) and any(text in str(cause) for text in _STREAM_REFUSALS)
    if not isinstance(cause, OSError) and not refused and cause is exc:
        return None
    if isinstance(cause, OSError) and cause.strerror:
        detail = f"{cause.strerror}{f': {cause.filename}' if cause.filename else ''}"
    elif refused:
        detail = f"the file system refused a write; torch.save reports {' '.join(str(cause).split())[:120]!r}"
    else:
        detail = f"{type(cause).__name__}: {' '.join(str(cause).split())[:200]}"
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    # torch.save's writer may report a refused write as a bad position, not as the OSError behind it
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    limit_note = f", a file size limit of {limit} bytes (ulimit -f)" if limit != resource.RLIM_INFINITY else ""
    return BridgeError(
        f"{out_dir}: writing the torch_dist checkpoint failed ({detail};"
        f" {shutil.disk_usage(existing).free} bytes free on that disk{limit_note}); the output path was left as it was"
    )
