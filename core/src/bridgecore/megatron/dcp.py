"""torch_dist files as bridgecore reads them: the names in a checkpoint directory, the bridgecore
record, safe reads of ``.metadata`` and the common state, and region reads of saved chunks.

    <dir>/latest_checkpointed_iteration.txt   "release" (or a training run's iteration)
    <dir>/release/                            the torch_dist files (any TP/PP/EP can load them)
    <dir>/bridgecore.json                     plugin, config.json, source tensor shapes and dtypes
    <dir>/hf/                                 tokenizer and other side files of the HF checkpoint
    <dir>/passthrough/                        HF tensors a plugin keeps verbatim
    <dir>/quantized/                          the block scales of a quantized source, as it stored them
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bridgecore.errors import BridgeError

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
META = "bridgecore.json"
SIDE = "hf"
PASSTHROUGH = "passthrough"
QUANTIZED = "quantized"
#: Where megatron-core keeps a save's common (non-sharded) state: ``common.pt`` (0.16), or this
#: ShardedObject inside the ``.distcp`` files (0.19, which still reads a ``common.pt`` where it finds one).
COMMON_FILE = "common.pt"
COMMON_STATE = "common_state"


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    """The bridgecore record of a Megatron checkpoint, or a one-line error saying what is missing."""
    path = ckpt_dir / META
    if not (ckpt_dir / RELEASE).is_dir() or not path.is_file():
        raise BridgeError(
            f"{ckpt_dir}: not a bridgecore Megatron checkpoint (expected {RELEASE}/ and {META},"
            " as written by `bridgecore import`); for one saved by Megatron-LM or Megatron-Bridge pass --hf-config"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BridgeError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


#: torch.distributed.checkpoint reads ``.metadata`` with plain ``pickle.load``; these are the only
#: globals a genuine one refers to (besides torch dtypes), so anything else is refused unread.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name) if module.startswith("torch") else None
        allowed = (module, name) in _METADATA_GLOBALS or isinstance(found, torch.dtype) and module == "torch"
        if not allowed and not (module in _METADATA_MODULES and isinstance(found, type)):
            raise pickle.UnpicklingError(f"refers to {module}.{name}")
        return found


def read_dcp_metadata(release: Path) -> Any:
    """torch.distributed.checkpoint's ``.metadata`` of ``release``, unpickled with the allowlist."""
    with open(release / ".metadata", "rb") as file:
        return MetadataUnpickler(file).load()


def common_in_shards() -> bool:
    """Whether the installed megatron-core saves the common state inside the ``.distcp`` files (0.19, whose
    save and load dropped the common strategies that read and write ``common.pt``)."""
    import inspect

    from megatron.core import dist_checkpointing

    return "common_strategy" not in inspect.signature(dist_checkpointing.load).parameters


def read_common(release: Path, metadata: Any | None = None) -> tuple[Any, str] | None:
    """The common state of a torch_dist save and where it was read, from ``common.pt`` or from the
    ``common_state`` object of the ``.distcp`` files (whichever megatron-core version wrote it), through
    torch's ``weights_only`` loader; None if the save has neither."""
    import io

    common = release / COMMON_FILE
    if common.exists():
        return torch.load(common, map_location="cpu", weights_only=True), str(common)
    metadata = read_dcp_metadata(release) if metadata is None else metadata
    found = [(i, info) for i, info in metadata.storage_data.items() if i.fqn.split("/")[0] == COMMON_STATE]
    if not found:
        return None
    if len(found) > 1 or found[0][1].transform_descriptors:
        raise BridgeError(f"{release}/.metadata: {COMMON_STATE} is saved in {len(found)} parts or transformed")
    index, info = found[0]
    where = release / info.relative_path
    with open(where, "rb") as file:
        file.seek(info.offset)
        data = file.read(info.length)
    if len(data) != info.length:
        raise BridgeError(f"{where}: ends before the end of {index.fqn} at byte {info.offset + info.length}")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return (state[0] if isinstance(state, list) and state else state), f"{where} ({index.fqn})"


def check_pickles(release: Path) -> None:
    """Refuse a torch_dist checkpoint whose pickles could run code, before megatron-core unpickles them.

    ``.metadata`` is unpickled with an allowlist of its own classes; the common state (``common.pt``,
    or megatron-core 0.19's ``common_state`` object) with torch's ``weights_only`` loader
    (megatron-core registers its few classes there), whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says.
    """
    try:
        read_common(release, read_dcp_metadata(release))
    except BridgeError:
        raise
    except FileNotFoundError as err:
        raise BridgeError(f"{err.filename}: missing; expected a complete torch_dist checkpoint") from None
    except Exception as err:  # noqa: BLE001 - any failure to read safely is the same refusal
        raise BridgeError(
            f"{release}: a pickle in the torch_dist checkpoint is not plain data"
            f" ({' '.join(str(err).split())[:200]}); refusing to load it because unpickling could run code"
        ) from None


@dataclass(frozen=True)
class Region:
    """Where a saved chunk lies inside its rank-local param: ``as_strided`` arguments."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def of(self, param: torch.Tensor) -> torch.Tensor:
        # as_strided's offset counts from the storage's start; a param that is a view of a larger
        # read of the HF file starts at its place in that read, not at zero.
        return torch.as_strided(param, self.size, self.stride, param.storage_offset() + self.offset)


class SavedChunks:
    """Reads regions of saved tensors from a torch_dist checkpoint's files straight into the caller's memory.

    DCP stores each chunk as a ``torch.save`` blob inside a ``.distcp`` file. Its reader unpickles
    each blob into a new tensor and copies it into the target; here only the blob's small pickle is
    read (onto the meta device, which records where the data lies), and the bytes go from the file
    into the target with one ``preadv``. Fresh memory costs a page fault per page, which on a VM
    costs more than the copy: a contiguous target is filled in place, any other through one
    staging buffer that is kept.
    """

    def __init__(self, path: Path, metadata: Any):
        self.path, self.metadata = path, metadata
        self._files: dict[str, int] = {}
        self._where: dict[Any, tuple[int, int, torch.Tensor]] = {}
        self._staging = torch.empty(0, dtype=torch.uint8)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def read_param(self, name: str, regions: list[tuple[Any, Region]], value: torch.Tensor) -> None:
        """Fill ``value`` (a whole param) from every saved chunk region that covers it."""
        from torch.distributed._shard._utils import narrow_tensor_by_index
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner_helpers import (
            create_read_items_for_chunk_list,
        )

        covered = sum(region.of(value).numel() for _, region in regions)
        if covered != value.numel():
            raise BridgeError(f"{name}: the saved chunks cover {covered} of its {value.numel()} values")
        for chunk, region in regions:
            if chunk.key not in self.metadata.state_dict_metadata:
                raise BridgeError(f"{name}: the checkpoint has no tensor {chunk.key}")
            sizes = torch.Size((1,) * chunk.prepend_axis_num + tuple(chunk.local_shape))
            target = region.of(value).view(sizes)
            for item in create_read_items_for_chunk_list(
                chunk.key,
                self.metadata.state_dict_metadata[chunk.key],
                [ChunkStorageMetadata(offsets=torch.Size(chunk.global_offset), sizes=sizes)],
            ):
                dest = narrow_tensor_by_index(target, item.dest_offsets, item.lengths)
                self.read(item.storage_index, item.storage_offsets, item.lengths, dest)

    def read(self, index: Any, offsets: Sequence[int], lengths: Sequence[int], dest: torch.Tensor) -> None:
        fd, start, saved = self._locate(index)
        whole = all(o == 0 for o in offsets) and tuple(lengths) == tuple(saved.shape)
        if whole and saved.is_contiguous() and dest.is_contiguous() and saved.dtype == dest.dtype:
            self._pread(fd, index, _bytes(dest), start + saved.storage_offset() * saved.element_size())
            return
        nbytes = saved.untyped_storage().nbytes()
        if self._staging.numel() < nbytes:
            self._staging = torch.empty(nbytes, dtype=torch.uint8)
        storage = self._staging[:nbytes]
        self._pread(fd, index, memoryview(storage.numpy()), start)
        src = torch.as_strided(storage.view(saved.dtype), saved.shape, saved.stride(), saved.storage_offset())
        dest.copy_(src[tuple(slice(o, o + n) for o, n in zip(offsets, lengths, strict=True))])

    def _locate(self, index: Any) -> tuple[int, int, torch.Tensor]:
        """The file, the byte where the saved tensor's storage begins, and the tensor on the meta device."""
        found = self._where.get(index)
        if found is not None:
            return found
        from torch.distributed.checkpoint.utils import _create_file_view

        info = self.metadata.storage_data.get(index)
        if info is None:
            raise BridgeError(f"{self.path}/.metadata: no storage entry for saved chunk {index.fqn} at {index.offset}")
        if info.transform_descriptors:
            raise BridgeError(
                f"{self.path / info.relative_path}: {index.fqn} is stored through {list(info.transform_descriptors)};"
                " the offline export reads untransformed torch_dist files only (the in-memory export reads these)"
            )
        fd = self._files.get(info.relative_path)
        if fd is None:
            fd = self._files[info.relative_path] = os.open(self.path / info.relative_path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        if size < info.offset + info.length:
            raise BridgeError(
                f"{self.path / info.relative_path}: ends at byte {size}, before the end of saved chunk {index.fqn}"
                f" at byte {info.offset + info.length} (truncated checkpoint)"
            )
        with open(fd, "rb", closefd=False) as file:
            try:
                saved = torch.load(
                    _create_file_view(file, info.offset, info.length), map_location="meta", weights_only=True
                )
            except Exception as err:
                raise BridgeError(
                    f"{self.path / info.relative_path}: saved chunk {index.fqn} at byte {info.offset} is not a"
                    f" readable tensor ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                ) from None
        storage_start = getattr(saved.untyped_storage(), "_checkpoint_offset", None) if torch.is_tensor(saved) else None
        if storage_start is None:
            raise BridgeError(f"{self.path / info.relative_path}: saved chunk {index.fqn} holds no tensor data")
        found = self._where[index] = (fd, info.offset + storage_start, saved)
        return found

    def _pread(self, fd: int, index: Any, into: memoryview, offset: int) -> None:
        done = 0
        while done < len(into):
            got = os.preadv(fd, [into[done:]], offset + done)
            if got == 0:
                raise BridgeError(
                    f"{self.path}: the file holding {index.fqn} ends before byte {offset + len(into)}"
                    " (truncated checkpoint or corrupt chunk)"
                )
            done += got


def _bytes(tensor: torch.Tensor) -> memoryview:
    """A writable view of a contiguous tensor's bytes."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
