"""Lazy, sliced reading of a Hugging Face safetensors checkpoint (one file or an indexed set).

Headers and the index are validated up front (no tensor byte is touched for that); a read then
``preadv``s only the bytes that hold the slice asked for into fresh memory, once, and checks that
every byte came. Tensor data is never memory-mapped: a page of a mapping whose file shrank while it
was in use (another process truncating or rewriting a shard in place) kills the process with SIGBUS
when touched, which no Python code can catch, and a converted model's params may be touched long
after they were read (the in-memory import saves params that took their values from the reader).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Self

import torch

from bridgecore.errors import BridgeError
from bridgecore.hf.config import leaves_checkpoint
from bridgecore.hf.dtypes import TORCH_DTYPES
from bridgecore.hf.header import Header, TensorEntry, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth")


class CheckpointReader:
    """A `Source` over the safetensors files of `hf_dir`; also a context manager that closes them."""

    def __init__(self, hf_dir: Path):
        self.hf_dir = Path(hf_dir)
        #: bytes of tensor data handed out by `read` so far.
        self.bytes_read = 0
        self._fds: dict[Path, int] = {}
        self._entries: dict[str, tuple[Path, TensorEntry]] = {}
        for header in _headers(self.hf_dir):
            for name, entry in header.entries.items():
                self._entries[name] = (header.path, entry)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the files; tensors already returned own their memory."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def keys(self) -> list[str]:
        """Tensor names in checkpoint order: shard by shard, in file order within each."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        entry = self._entry(name)
        if entry.code not in TORCH_DTYPES:
            raise BridgeError(
                f"{self.file_of(name)}: tensor {name!r} is {entry.code},"
                " a packed sub-byte dtype bridgecore does not read"
            )
        return TORCH_DTYPES[entry.code]

    def file_of(self, name: str) -> Path:
        self._entry(name)
        return self._entries[name][0]

    def nbytes(self, name: str) -> int:
        entry = self._entry(name)
        return entry.end - entry.begin

    def read(self, name: str, index: tuple[slice | int, ...] = ()) -> torch.Tensor:
        """`tensor[index]` without reading the rest; ints drop their dim, slices must have step 1.

        Only the bytes from the slice's first element to its last are read; a slice of whole leading
        rows (a TP split along dim 0) comes back as its own contiguous tensor, any other as a view of
        that byte range."""
        entry, dtype = self._entry(name), self.dtype(name)
        index = normalized_index(index, entry.shape, f"{self.file_of(name)}: tensor {name!r}")
        full = index + tuple(slice(0, size) for size in entry.shape[len(index) :])
        strides = _contiguous_strides(entry.shape)
        kept = [
            (item.stop - item.start, stride)
            for item, stride in zip(full, strides, strict=True)
            if isinstance(item, slice)
        ]
        shape = tuple(size for size, _ in kept)
        if any(size == 0 for size in shape) or entry.end == entry.begin:
            return torch.empty(shape, dtype=dtype)
        first = sum((item if isinstance(item, int) else item.start) * s for item, s in zip(full, strides, strict=True))
        last = sum(
            (item if isinstance(item, int) else item.stop - 1) * s for item, s in zip(full, strides, strict=True)
        )
        size = dtype.itemsize
        data = self._pread(name, entry.begin + first * size, (last + 1 - first) * size).view(dtype)
        part = data.view(shape) if data.numel() == math.prod(shape) else data.as_strided(shape, [s for _, s in kept])
        self.bytes_read += part.numel() * size
        return part

    def _pread(self, name: str, offset: int, length: int) -> torch.Tensor:
        """``length`` bytes of ``name``'s file from ``offset`` into fresh memory, or a one-line error
        when the file ends before them."""
        path = self.file_of(name)
        buffer = torch.empty(length, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        done = 0
        try:
            while done < length:
                got = os.preadv(self._fd(path), [view[done:]], offset + done)
                if got == 0:
                    raise BridgeError(
                        f"{path}: ends at byte {os.fstat(self._fd(path)).st_size}, before tensor {name!r} ends at"
                        f" byte {self._entry(name).end}; the file was truncated or replaced while being read"
                    )
                done += got
        except OSError as err:
            raise BridgeError(f"{path}: reading tensor {name!r} failed ({err.strerror or err})") from None
        return buffer

    def _entry(self, name: str) -> TensorEntry:
        if name not in self._entries:
            raise BridgeError(f"{self.hf_dir}: no tensor named {name!r} in the checkpoint")
        return self._entries[name][1]

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            try:
                self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as err:
                raise BridgeError(f"{path}: cannot be opened for reading ({err.strerror})") from None
        return self._fds[path]


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return strides[::-1]


def normalized_index(index: tuple[slice | int, ...], shape: tuple[int, ...], where: str) -> tuple[slice | int, ...]:
    """`index` with bounds checked: out-of-range selections are mapping bugs, not something to clamp."""
    if len(index) > len(shape):
        raise BridgeError(f"{where}: index {index} has {len(index)} entries for a {len(shape)}-dim tensor")
    normalized: list[slice | int] = []
    # A short index leaves the trailing dims whole, so the zip stops at the index's end.
    for dim, (item, size) in enumerate(zip(index, shape, strict=False)):
        if isinstance(item, int) and not isinstance(item, bool):
            if not -size <= item < size:
                raise BridgeError(f"{where}: index {item} on dim {dim} is outside size {size}")
            normalized.append(item % size)
            continue
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise BridgeError(f"{where}: index {item!r} on dim {dim}; expected an int or a slice with step 1")
        start, stop = _bound(item.start, 0, size), _bound(item.stop, size, size)
        if not 0 <= start <= stop <= size:
            raise BridgeError(f"{where}: slice {item.start}:{item.stop} on dim {dim} is outside size {size}")
        normalized.append(slice(start, stop))
    return tuple(normalized)


def _bound(value: int | None, default: int, size: int) -> int:
    if value is None:
        return default
    return value + size if value < 0 else value


def _headers(hf_dir: Path) -> list[Header]:
    if not hf_dir.is_dir():
        raise BridgeError(f"{hf_dir}: not a directory; expected a Hugging Face checkpoint directory")
    if (hf_dir / SINGLE_FILE).exists():
        return [read_header(_contained(hf_dir, SINGLE_FILE, hf_dir / SINGLE_FILE))]
    if (hf_dir / INDEX_FILE).exists():
        return _indexed_headers(hf_dir)
    if any(p.is_file() for pattern in PICKLE_PATTERNS for p in hf_dir.glob(pattern)):
        raise BridgeError(
            f"{hf_dir}: holds only pickle weights (pytorch_model*.bin / *.pt / *.pth); pickle checkpoints are not"
            " read because loading them can run code. Expected model.safetensors or model.safetensors.index.json"
        )
    raise BridgeError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}; expected a safetensors checkpoint")


def _indexed_headers(hf_dir: Path) -> list[Header]:
    index_path = hf_dir / INDEX_FILE
    weight_map = _weight_map(index_path)
    # Every name is checked before any file is opened, so a hostile index opens nothing outside.
    paths = {file_name: _contained(hf_dir, file_name, index_path) for file_name in sorted(set(weight_map.values()))}
    headers = []
    for file_name, path in paths.items():
        header = read_header(path)
        listed = {name for name, file in weight_map.items() if file == file_name}
        missing = sorted(listed - header.entries.keys())
        if missing:
            raise BridgeError(
                f"{index_path}: maps {_few(missing)} to {file_name}, whose header does not hold {_them(missing)}"
            )
        unlisted = sorted(header.entries.keys() - listed)
        if unlisted:
            raise BridgeError(
                f"{header.path}: holds {_few(unlisted)}, which {INDEX_FILE} does not map to this file;"
                " expected the index to list every tensor of every shard"
            )
        headers.append(header)
    return headers


def _weight_map(index_path: Path) -> dict[str, str]:
    try:
        document = json.loads(index_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BridgeError(f"{index_path}: not JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BridgeError(f"{index_path}: cannot be read as UTF-8 text ({err})") from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise BridgeError(f'{index_path}: expected an object with a "weight_map" object of tensor name -> file name')
    return weight_map


def _contained(hf_dir: Path, file_name: str, listed_in: Path) -> Path:
    """The file `file_name` of `hf_dir`, refusing names or symlinks that lead outside it."""
    plain = file_name not in ("", ".", "..") and "/" not in file_name and "\\" not in file_name
    if not plain:
        raise BridgeError(
            f"{listed_in}: names shard {file_name!r}; expected a plain file name inside the checkpoint directory"
        )
    path = hf_dir / file_name
    if not path.is_file():
        raise BridgeError(f"{listed_in}: names shard {file_name!r}, which is not a file in {hf_dir}")
    real = leaves_checkpoint(hf_dir, path)
    if real is not None:
        raise BridgeError(
            f"{path}: is a symlink to {real}, outside the checkpoint directory; expected a file inside it"
        )
    return path


def _few(names: list[str], shown: int = 5) -> str:
    listed = ", ".join(repr(n) for n in names[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _them(names: list[str]) -> str:
    return "it" if len(names) == 1 else "them"
