"""megatron-core distributed checkpoints (torch_dist), written and loaded in the layout Megatron-LM
``--load`` reads (see :mod:`bridgecore.megatron.dcp` for the directory's files).

Like the HF writer, the directory is written under a temporary sibling and moved into place only
when complete.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bridgecore.errors import BridgeError
from bridgecore.hf.config import copy_side_files
from bridgecore.hf.writer import check_target, move_into_place, remove_temporary, temporary_sibling
from bridgecore.megatron import parallel, training
from bridgecore.megatron.compat import cpu_compat
from bridgecore.megatron.dcp import META, RELEASE, SIDE, TRACKER, SavedChunks
from bridgecore.megatron.extra_state import add_extra_states
from bridgecore.megatron.save import threaded_save_strategy, write_error
from bridgecore.megatron.state import exact_storage, sharded_state_dict, state_key


def _share_views(state: dict[str, Any]) -> None:
    """Build the state dict's tensor factories (the gate and up halves of a gated fc1) as megatron-core's
    save would, and give every contiguous view its exact storage, so its writer saves the model's
    own memory instead of cloning those views first (about 0.45x the model, kept until the write ends)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    def share(item: Any) -> Any:
        if isinstance(item, ShardedTensor) and item.data is not None:
            item.data = exact_storage(item.data)
        return item

    apply_factories(state)
    dict_list_map_inplace(share, state)


def save_dist(
    chunks: list[torch.nn.Module],
    out_dir: Path,
    meta: dict[str, Any],
    side_files_from: Path | None,
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Save this rank's chunks into ``out_dir`` with every other rank (a collective).

    ``extra(temp_dir)`` runs on rank 0 before the directory is moved into place, to add files."""
    from megatron.core import dist_checkpointing

    parallel.collective(check_target, out_dir, overwrite)
    with staged_release(out_dir) as temp:
        state: dict[str, Any] = {"checkpoint_version": 3.0, "iteration": 0}
        with cpu_compat():
            for i, chunk in enumerate(chunks):
                state[state_key(i, chunks)] = sharded_state_dict(chunk)
            add_extra_states(state)
            _share_views(state)

            def save() -> None:
                # the one-line error is made here, so that it is what a failing rank tells the others
                try:
                    dist_checkpointing.save(state, str(temp / RELEASE), sharded_strategy=threaded_save_strategy())
                except Exception as exc:
                    error = write_error(exc, out_dir)
                    if error is None or error is exc:
                        raise
                    raise error from exc

            parallel.collective(save)

        def finish() -> None:
            if parallel.rank() == 0:
                if extra is not None:
                    extra(temp)
                publish(temp, out_dir, meta, side_files_from, overwrite)

        parallel.collective(finish)


@contextlib.contextmanager
def staged_release(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling of ``out_dir``, the same on every rank, with its ``release/`` made by rank 0
    before any rank writes (a collective). On a failure an error of the save is made one line naming
    ``out_dir`` (with the free space the write met) and left for the other ranks, the first rank's error
    is raised, and every rank removes the temporary."""
    temp = Path(parallel.broadcast_object(str(temporary_sibling(out_dir, "tmp"))))
    try:

        def prepare() -> None:
            if parallel.rank() == 0:
                (temp / RELEASE).mkdir(parents=True)

        parallel.collective(prepare)
        yield temp
    except BaseException as exc:
        error = write_error(exc, out_dir)
        if isinstance(error, Exception) and error is not exc:
            parallel.publish_error(str(error))
        first = parallel.first_error() if isinstance(error, Exception) else None
        # every rank removes it once its own writes have stopped: a rank still inside the save when
        # rank 0 failed would otherwise recreate files in it after rank 0 removed it
        remove_temporary(temp)
        if first and not first.startswith(f"rank {parallel.rank()}: "):
            raise BridgeError(first) from exc
        if error is None or error is exc:
            raise
        raise error from exc


def publish(
    temp: Path, out_dir: Path, meta: dict[str, Any], side_files_from: Path | None, overwrite: bool = False
) -> None:
    """Add the tracker, the bridgecore record and the side files to ``temp`` (whose ``release/``
    holds the torch_dist files) and move it to ``out_dir``.

    The target is checked again here, as the run may have taken hours: what appeared there meanwhile
    (another run's output, anyone's directory) is replaced only with ``overwrite``, else refused."""
    (temp / TRACKER).write_text(RELEASE)
    (temp / META).write_text(json.dumps(meta, indent=1) + "\n")
    if side_files_from is not None:
        (temp / SIDE).mkdir()
        copy_side_files(side_files_from, temp / SIDE)
    check_target(out_dir, overwrite)
    move_into_place(temp, out_dir)


class _InPlaceRead:
    """Mixed into DCP's file system reader that megatron-core's load makes: every tensor chunk goes to
    :class:`bridgecore.megatron.dcp.SavedChunks`, which ``preadv``s a whole contiguous chunk into its target
    in place and any other through one kept staging buffer; byte items and transformed (compressed)
    chunks stay with DCP's reader."""

    def set_up_storage_reader(self, metadata: Any, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, *args, **kwargs)
        self._saved_metadata = metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        import dataclasses

        from torch.distributed.checkpoint.planner import LoadItemType

        saved = SavedChunks(Path(self.path), self._saved_metadata)
        rest = []
        try:
            for item in plan.items:
                if item.type == LoadItemType.BYTE_IO or self.storage_data[item.storage_index].transform_descriptors:
                    rest.append(item)
                    continue
                target = planner.resolve_tensor(item).detach()
                if tuple(target.shape) != tuple(item.lengths):
                    raise BridgeError(
                        f"{self.path}: saved chunk {item.storage_index.fqn} is read as {list(item.lengths)}"
                        f" into a target of {list(target.shape)}"
                    )
                saved.read(item.storage_index, item.storage_offsets, item.lengths, target)
                planner.commit_tensor(item, target)
        finally:
            saved.close()
        return super().read_data(dataclasses.replace(plan, items=rest), planner)


@contextlib.contextmanager
def _reading_in_place() -> Iterator[None]:
    """Make megatron-core's torch_dist load read each saved chunk straight into its target.

    DCP's reader ``torch.load``s every chunk into new memory and copies that into the target (the
    model's param, or a view of it): as much fresh memory as the model, a page fault per page, and a
    second copy. The local file system reader megatron-core makes (DCP's, or its caching subclass)
    reads through :class:`_InPlaceRead` instead; a multi-storage client's reader is left as it is."""
    from megatron.core.dist_checkpointing.strategies import torch as strategy
    from torch.distributed.checkpoint import FileSystemReader

    make_reader = getattr(strategy, "_get_filesystem_reader", None)
    msc = getattr(strategy, "MultiStorageClientFeature", None)
    if make_reader is None or (msc is not None and msc.is_enabled()):
        yield
        return

    def in_place_reader(*args: Any, **kwargs: Any) -> Any:
        found = make_reader(*args, **kwargs)
        if not isinstance(found, FileSystemReader) or isinstance(found, _InPlaceRead):
            return found
        # the same reader (its state copied, whatever its constructor takes), reading through the mixin
        mixed = type(f"InPlace{type(found).__name__}", (_InPlaceRead, type(found)), {})
        reader = mixed.__new__(mixed)
        reader.__dict__.update(found.__dict__)
        return reader

    strategy._get_filesystem_reader = in_place_reader
    try:
        yield
    finally:
        strategy._get_filesystem_reader = make_reader


def _load_files(state: dict[str, Any], release: Path) -> dict[str, Any]:
    """megatron-core's load of ``state`` from ``release``, its model tensors only (``common.pt`` is left
    unread); files that do not describe this model (a ``.metadata`` of another checkpoint, chunks that
    are not where it says) are one line naming them."""
    try:
        with _reading_in_place():
            return training.load_model_only(state, release)
    except BridgeError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to read the files is the same refusal
        cause = err
    except BaseException as err:  # DCP wraps a reader's failure in a BaseException
        failures = getattr(err, "failures", None)
        if not failures:
            raise
        cause = next(iter(failures.values()))[0]
    raise BridgeError(
        f"{release}: the torch_dist files do not hold this model's tensors as their .metadata describes"
        f" ({type(cause).__name__}: {' '.join(str(cause).split())[:200]}); expected the files of one save"
    ) from None


def _where(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride()


def _merge_in_place(state: dict[str, Any]) -> None:
    """Make the merges of ``state``'s tensor factories (a gated fc1's gate and up halves) give back the
    model's own param instead of a new tensor.

    megatron-core's load builds each factory's pieces as views of the param, reads the checkpoint into
    them in place, and then merges them, ``torch.cat`` for a gated fc1: a new tensor per fc1, every one
    alive until the load returns (about 0.55x a Llama model on top of it). A factory's merge inverts its
    build, so where the loaded pieces are the very views the build makes of the param, the param already
    holds the merged value and is returned as it is. Any other merge is copied into the param at once,
    so at most one merged tensor lives at a time."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def in_place(factory: ShardedTensorFactory) -> Callable[[Any], Any]:
        param, merge = factory.data, factory.merge_fn
        views = [_where(piece.data) for piece in nested_values([factory.build()]) if isinstance(piece, ShardedTensor)]

        def merged(loaded: Any) -> Any:
            pieces = list(nested_values([loaded]))
            if views and all(isinstance(t, torch.Tensor) for t in pieces) and [_where(t) for t in pieces] == views:
                return param
            value = merge(loaded)
            if not isinstance(value, torch.Tensor) or value.shape != param.shape or value.dtype != param.dtype:
                return value
            with torch.no_grad():
                param.copy_(value)
            return param

        return merged

    def wrap(item: Any) -> Any:
        if isinstance(item, ShardedTensorFactory) and isinstance(item.data, torch.Tensor):
            item.merge_fn = in_place(item)
        return item

    dict_list_map_inplace(wrap, state)


def load_dist(chunks: list[torch.nn.Module], torch_dist: Path, config: Any) -> None:
    """Load the model weights of a torch_dist save (``release/`` or a training run's ``iter_NNNNNNN/``)
    into this rank's chunks, whatever layout saved them; optimizer and RNG state are never read."""
    metadata = parallel.collective(training.saved_metadata, torch_dist)
    key_layout = parallel.collective(training.key_layout, chunks, metadata)
    state = {state_key(i, chunks): sharded_state_dict(chunk, key_layout) for i, chunk in enumerate(chunks)}
    parallel.collective(training.check_model_keys, config, training.requested_tensors(state), metadata, str(torch_dist))
    _merge_in_place(state)
    with cpu_compat():
        loaded = parallel.collective(_load_files, state, torch_dist)

    def apply() -> None:
        for i, chunk in enumerate(chunks):
            result = chunk.load_state_dict(loaded[state_key(i, chunks)], strict=False)
            missing = [k for k in result.missing_keys if not k.endswith("._extra_state")]
            if missing:
                raise BridgeError(f"{torch_dist}: checkpoint lacks {len(missing)} model tensors, e.g. {missing[0]}")

    parallel.collective(apply)
