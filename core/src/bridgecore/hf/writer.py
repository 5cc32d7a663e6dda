"""Streaming, parallel, atomic writing of sharded safetensors checkpoints.

Every process computes the same layout from the same plan, so each can `pwrite` its tensors at their
final offsets in shared, pre-sized files without coordinating: one process `create`s a hidden
temporary directory next to the output, the others `attach` to it, all `write`, and one `commit`s
after gathering what each wrote. Only a complete, verified checkpoint is ever renamed to the output
path; an interrupted run leaves at most a hidden `.<name>.tmp-*` directory.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import secrets
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bridgecore.errors import BridgeError
from bridgecore.hf.config import CONFIG_FILE, copy_side_files
from bridgecore.hf.dtypes import code_of, data_bytes, layout_rank
from bridgecore.hf.header import METADATA_KEY, encode_header
from bridgecore.hf.quantized import MODELOPT_FILE
from bridgecore.hf.reader import INDEX_FILE, SINGLE_FILE

DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
FILE_METADATA = {"format": "pt"}
#: Linux writes at most this much per write call; larger buffers go in pieces.
_MAX_WRITE = 1 << 30
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}

PlanEntry = tuple[str, Sequence[int], torch.dtype]
#: a shard file name a restored layout may use: no directory part, not hidden.
_PLAIN_FILE = re.compile(r"[^/\\.][^/\\]*\.safetensors")
#: What one process wrote: (tensor name, expert slab or None for the whole tensor).
Written = list[tuple[str, int | None]]


def parse_size(size: str | int) -> int:
    """Bytes in `size`: an int, or a string such as "5GB", "500MB", "2GiB" (KB/MB/GB are powers of 1000)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        unit = match.group(2).upper() if match else None
        if unit not in _UNITS:
            raise BridgeError(f"shard size {size!r} is not understood; expected e.g. 5GB, 500MB, 2GiB or a byte count")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise BridgeError(f"shard size {size!r} is not positive; expected a size such as 5GB")
    return value


def check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing output unless `overwrite`; call it before any work, `commit` calls it again."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise BridgeError(f"{out_dir}: exists and is not a directory; expected a new or existing output directory")
    if out_dir.exists() and not overwrite:
        raise BridgeError(f"{out_dir}: already exists; expected a new output directory (or pass --overwrite)")


#: the hidden siblings a run makes beside its output: the output being written, the old output
#: during an --overwrite, the calibrated export a --quant format is made from.
TEMPORARY_KINDS = ("tmp", "old", "staging")


def temporary_prefix(out_dir: Path, kind: str) -> str:
    """The name, up to its random part, of a hidden `kind` sibling of `out_dir`."""
    return f".{Path(out_dir).name}.{kind}-"


def temporary_sibling(out_dir: Path, kind: str) -> Path:
    """A fresh hidden `kind` sibling path of `out_dir` (not created)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{temporary_prefix(out_dir, kind)}{secrets.token_hex(4)}"


def remove_temporary(path: Path) -> None:
    """Remove a temporary directory whole, holding SIGINT and SIGTERM until it is gone (then they are
    delivered): under torchrun the SIGTERM that stops a failed run's other ranks often arrives while
    rank 0 is removing its temporary output, and used to leave part of it behind."""
    import signal
    import threading

    held = {signal.SIGINT, signal.SIGTERM}
    main = threading.current_thread() is threading.main_thread()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held) if main else None
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        if before is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


def leftover_temporaries(out_dir: Path) -> list[Path]:
    """The hidden siblings of `out_dir` (`.<name>.tmp-*`, `.old-*`, `.staging-*`) that interrupted runs leave."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    return sorted(
        p for kind in TEMPORARY_KINDS for p in out_dir.parent.glob(f"{glob.escape(temporary_prefix(out_dir, kind))}*")
    )


@dataclass(frozen=True)
class Placement:
    """Where a planned tensor lives: its file and absolute byte offset, with its shape and dtype."""

    file: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Shard:
    file: str
    #: (name, safetensors code, shape) in the order of the file's data section.
    tensors: list[tuple[str, str, tuple[int, ...]]]
    header: bytes

    @property
    def size(self) -> int:
        return len(self.header) + sum(data_bytes(code, shape) for _, code, shape in self.tensors)


class ShardedWriter:
    """Writes the tensors of `plan` (ordered `(name, shape, dtype)`) as HF safetensors shards in `out_dir`."""

    def __init__(
        self,
        out_dir: Path,
        plan: Sequence[PlanEntry],
        max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
        files: dict[str, str] | None = None,
        index_metadata: dict[str, Any] | None = None,
    ):
        """``files`` (tensor name -> file name, for every planned tensor) restores a known shard split:
        each file holds its tensors in plan order; without it, shards fill up to ``max_shard_size``.
        ``index_metadata`` is the source index's ``metadata`` to restore with them (its ``total_size``
        recomputed)."""
        self.out_dir = Path(out_dir)
        self.index_metadata = index_metadata
        if files is None:
            self.shards, self.placements = _layout(plan, parse_size(max_shard_size))
        else:
            self.shards, self.placements = _source_layout(plan, files)
        #: whether ``commit`` writes the index: several files, or files not named as one file is.
        self.indexed = len(self.shards) > 1 or any(shard.file != SINGLE_FILE for shard in self.shards)
        self.temp_dir: Path | None = None
        self._files: dict[str, int] = {}
        self._written: Written = []

    @classmethod
    def attach(
        cls,
        out_dir: Path,
        plan: Sequence[PlanEntry],
        max_shard_size: str | int,
        temp_dir: Path,
        files: dict[str, str] | None = None,
    ) -> ShardedWriter:
        """A writer for another process, into the temporary directory that `create` made."""
        writer = cls(out_dir, plan, max_shard_size, files)
        writer.temp_dir = Path(temp_dir)
        for shard in writer.shards:
            path = writer.temp_dir / shard.file
            if not path.is_file() or path.stat().st_size != shard.size:
                raise BridgeError(
                    f"{path}: missing or not {shard.size} bytes; expected the file `create` made for this plan"
                )
        return writer

    def create(self) -> Path:
        """Make the temporary directory with every shard's header written and its size reserved."""
        with _disk_errors(self.out_dir, self.out_dir.parent):
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.temp_dir = temporary_sibling(self.out_dir, "tmp")
            self.temp_dir.mkdir()
            for shard in self.shards:
                with open(self.temp_dir / shard.file, "wb") as file:
                    file.write(shard.header)
                    file.truncate(shard.size)
        return self.temp_dir

    def write(self, name: str, tensor: torch.Tensor, expert: int | None = None) -> None:
        """Write `tensor` as planned tensor `name`, or as slab `[expert]` of a stacked planned tensor."""
        placement = self._placement(name)
        offset, shape = self._target(name, placement, expert)
        if tuple(tensor.shape) != shape or tensor.dtype != placement.dtype:
            raise BridgeError(
                f"{name}{'' if expert is None else f'[{expert}]'}: got {tensor.dtype} {list(tensor.shape)},"
                f" expected {placement.dtype} {list(shape)} as planned"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        # The shard files are sparse until written, so a full disk shows up here, not in `create`.
        with _disk_errors(self.out_dir, self._require_temp_dir() / placement.file):
            _pwrite_all(self._fd(placement.file), memoryview(data.numpy()), offset)
        self._written.append((name, expert))

    def written(self) -> Written:
        """What this process wrote, to gather on the committing process."""
        return list(self._written)

    def commit(
        self,
        written_by_all: Iterable[Written],
        side_files_from: Path | None = None,
        overwrite: bool = False,
        config: dict[str, Any] | None = None,
    ) -> None:
        """Verify, finish and move the checkpoint to `out_dir`; `written_by_all` holds every process's `written()`.

        `config`, when given, is written as config.json in place of the side files' copy, which leaves out
        the source's description of its quantization (ModelOpt's hf_quant_config.json) too."""
        temp_dir = self._require_temp_dir()
        check_target(self.out_dir, overwrite)
        self._check_coverage([item for written in written_by_all for item in written])
        self._close_files()
        with _disk_errors(self.out_dir, temp_dir):
            for shard in self.shards:
                _sync_file(temp_dir / shard.file, shard.size)
            if self.indexed:
                _write_index(temp_dir / INDEX_FILE, self.placements, self.index_metadata)
            if side_files_from is not None:
                copy_side_files(Path(side_files_from), temp_dir)
            if config is not None:
                (temp_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
                (temp_dir / MODELOPT_FILE).unlink(missing_ok=True)
            _fsync_dir(temp_dir)
        move_into_place(temp_dir, self.out_dir)
        self.temp_dir = None

    def abort(self) -> None:
        """Remove the temporary directory; the output path is left as it was."""
        self._close_files()
        if self.temp_dir is not None:
            remove_temporary(self.temp_dir)
            self.temp_dir = None

    def _placement(self, name: str) -> Placement:
        if name not in self.placements:
            raise BridgeError(f"{name}: not in the export plan of {self.out_dir}")
        return self.placements[name]

    def _target(self, name: str, placement: Placement, expert: int | None) -> tuple[int, tuple[int, ...]]:
        if expert is None:
            return placement.offset, placement.shape
        experts = placement.shape[0] if placement.shape else 0
        if not 0 <= expert < experts:
            raise BridgeError(f"{name}: expert slab {expert} is outside the planned shape {list(placement.shape)}")
        return placement.offset + expert * (placement.nbytes // experts), placement.shape[1:]

    def _fd(self, file: str) -> int:
        if file not in self._files:
            self._files[file] = os.open(self._require_temp_dir() / file, os.O_WRONLY)
        return self._files[file]

    def _require_temp_dir(self) -> Path:
        if self.temp_dir is None:
            raise BridgeError(f"{self.out_dir}: writer has no temporary directory; expected create() or attach() first")
        return self.temp_dir

    def _close_files(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def _check_coverage(self, written: Written) -> None:
        """Every planned tensor written exactly once: whole, or each expert slab once."""
        counts = Counter(written)
        problems = [f"{_label(item)} written {n} times" for item, n in counts.items() if n > 1]
        problems += [f"{name} is not in the plan" for name in {n for n, _ in counts} - self.placements.keys()]
        for name, placement in self.placements.items():
            slabs = sorted(e for n, e in counts if n == name and e is not None)
            whole = (name, None) in counts
            if whole and slabs:
                problems.append(f"{name} written whole and as slabs {slabs}")
            elif not whole and not slabs:
                problems.append(f"{name} not written")
            elif slabs and len(slabs) != placement.shape[0]:
                missing = sorted(set(range(placement.shape[0])) - set(slabs))
                problems.append(f"{name} misses expert slabs {missing}")
        if problems:
            shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
            raise BridgeError(f"{self.out_dir}: not committed, expected every planned tensor written once: {shown}")


def _layout(plan: Sequence[PlanEntry], max_shard_size: int) -> tuple[list[Shard], dict[str, Placement]]:
    """Shards filled in plan order up to `max_shard_size` data bytes, each laid out as `save_file` would."""
    groups: list[list[tuple[str, str, tuple[int, ...], torch.dtype]]] = [[]]
    group_bytes = 0
    seen: set[str] = set()
    for name, shape, dtype in plan:
        if name in seen or name == METADATA_KEY:
            raise BridgeError(f"{name}: appears twice in the export plan (or is reserved); expected unique names")
        seen.add(name)
        code, shape = code_of(dtype, name), tuple(int(s) for s in shape)
        size = data_bytes(code, shape)
        if groups[-1] and group_bytes + size > max_shard_size:
            groups.append([])
            group_bytes = 0
        groups[-1].append((name, code, shape, dtype))
        group_bytes += size
    shards, placements = [], {}
    for number, group in enumerate(groups, start=1):
        file = SINGLE_FILE if len(groups) == 1 else f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        group.sort(key=lambda t: (-layout_rank(t[1]), t[0]))
        shards.append(_shard(file, group, placements))
    # The index lists tensors in plan order, whatever order the files hold them in.
    ordered = {name: placements[name] for name, _, _ in plan}
    return shards, ordered


def _shard(
    file: str, group: list[tuple[str, str, tuple[int, ...], torch.dtype]], placements: dict[str, Placement]
) -> Shard:
    """The shard ``file`` holding ``group``'s tensors in that order; records each one's placement."""
    tensors = [(name, code, shape) for name, code, shape, _ in group]
    header = encode_header(tensors, FILE_METADATA)
    offset = len(header)
    for name, code, shape, dtype in group:
        size = data_bytes(code, shape)
        placements[name] = Placement(file, offset, size, shape, dtype)
        offset += size
    return Shard(file, tensors, header)


def _source_layout(plan: Sequence[PlanEntry], files: dict[str, str]) -> tuple[list[Shard], dict[str, Placement]]:
    """Shards as named by ``files``, in the order their first tensors come in the plan, each holding
    its tensors in plan order (a source checkpoint's own order when the plan follows it)."""
    groups: dict[str, list[tuple[str, str, tuple[int, ...], torch.dtype]]] = {}
    seen: set[str] = set()
    for name, shape, dtype in plan:
        if name in seen or name == METADATA_KEY:
            raise BridgeError(f"{name}: appears twice in the export plan (or is reserved); expected unique names")
        if name not in files:
            raise BridgeError(f"{name}: the export plan names no file for it; expected one for every tensor")
        file = files[name]
        if not _PLAIN_FILE.fullmatch(file):
            raise BridgeError(f"{name}: planned for file {file!r}; expected a plain NAME.safetensors file name")
        seen.add(name)
        code = code_of(dtype, name)
        groups.setdefault(file, []).append((name, code, tuple(int(s) for s in shape), dtype))
    shards, placements = [], {}
    for file, group in groups.items():
        shards.append(_shard(file, group, placements))
    # The index lists tensors in the order of ``files``, whatever order the files hold them in.
    return shards, {name: placements[name] for name in files if name in placements}


@contextmanager
def _disk_errors(out_dir: Path, where: Path) -> Iterator[None]:
    """OS errors (a full disk, no permission) as one line that says the output was not touched."""
    try:
        yield
    except OSError as err:
        raise BridgeError(
            f"{err.filename or where}: {err.strerror or err} while writing {out_dir};"
            " the output path was left as it was"
        ) from None


def _label(item: tuple[str, int | None]) -> str:
    name, expert = item
    return name if expert is None else f"{name}[{expert}]"


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done : done + _MAX_WRITE], offset + done)


def _sync_file(path: Path, expected_size: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size != expected_size:
            raise BridgeError(f"{path}: is {size} bytes, expected {expected_size} as planned; not committed")
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_index(path: Path, placements: dict[str, Placement], metadata: dict[str, Any] | None = None) -> None:
    index = {
        "metadata": {**(metadata or {}), "total_size": sum(p.nbytes for p in placements.values())},
        "weight_map": {name: p.file for name, p in placements.items()},
    }
    path.write_text(json.dumps(index, indent=2) + "\n")


def move_into_place(temp_dir: Path, out_dir: Path) -> None:
    """Make the finished ``temp_dir`` the output ``out_dir``, replacing one that is there.

    An existing output is exchanged with ``temp_dir`` in one step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``) and deleted afterwards from there, so a kill at any moment leaves the old or
    the new output at ``out_dir``. Where the file system cannot exchange, the old output is moved
    aside first and back if the move fails; a kill between those two renames leaves it beside
    ``out_dir`` as a hidden ``.old-*`` sibling, which the next run names. A failure is one line and
    leaves ``out_dir`` as it was."""
    try:
        if out_dir.exists() and _exchange(temp_dir, out_dir):
            _fsync_dir(out_dir.parent)
            remove_temporary(temp_dir)  # the old output, now
            return
        old = None
        if out_dir.exists():
            old = temporary_sibling(out_dir, "old")
            out_dir.rename(old)
        try:
            temp_dir.rename(out_dir)
        except OSError:
            if old is not None:
                old.rename(out_dir)
            raise
    except OSError as err:
        appeared = err.errno in (errno.ENOTEMPTY, errno.EEXIST)
        raise BridgeError(
            f"{out_dir}: appeared while this run was writing; pass --overwrite to replace it"
            if appeared
            else f"{out_dir}: could not move the finished checkpoint into place ({err.strerror})"
        ) from None
    _fsync_dir(out_dir.parent)
    if old is not None:
        remove_temporary(old)


#: ``renameat2``'s flag that swaps two existing paths atomically, and its "relative to the cwd" fd.
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the existing paths ``a`` and ``b`` in one atomic step; False where the system cannot."""
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # a file system (or kernel) without the exchange
    raise OSError(code, os.strerror(code), str(b))
