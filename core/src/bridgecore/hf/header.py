"""The safetensors header: parsed and checked before any byte of tensor data is touched, and encoded
exactly as `safetensors.torch.save_file` encodes it.

A file is an 8-byte little-endian header length N, N bytes of JSON, then the data section. Every
check here runs on sizes taken from the file itself, so a corrupt header can never make us
allocate or map more than the file holds.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from bridgecore.errors import BridgeError
from bridgecore.hf.dtypes import BITS, data_bytes

#: Larger headers are refused, as safetensors refuses them.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file: `begin`/`end` are absolute byte offsets in the file."""

    name: str
    code: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    path: Path
    #: tensors in the order their bytes appear in the file.
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(path: Path) -> Header:
    """Parse and validate the header of the safetensors file at `path`."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            prefix = file.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
            if length is None or length > min(MAX_HEADER_BYTES, size - 8):
                return parse_header(prefix, path, size)
            return parse_header(prefix + file.read(length), path, size)
    except OSError as err:
        raise BridgeError(f"{path}: cannot read safetensors file ({err.strerror}); expected a readable file") from None


def parse_header(raw: bytes, path: Path, file_size: int) -> Header:
    """Validate `raw` (the length prefix and the JSON header) of a file of `file_size` bytes."""
    if len(raw) < 8:
        raise BridgeError(f"{path}: file is {file_size} bytes, too short for the 8-byte safetensors header length")
    length = struct.unpack("<Q", raw[:8])[0]
    if length > MAX_HEADER_BYTES:
        raise BridgeError(f"{path}: header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit; file is corrupt")
    if 8 + length > file_size or len(raw) < 8 + length:
        raise BridgeError(
            f"{path}: header length {length} runs past the end of the {file_size}-byte file; file is truncated"
        )
    document = _decode_json(raw[8 : 8 + length], path)
    metadata = _metadata(document.pop(METADATA_KEY, {}), path)
    data_start = 8 + length
    entries = [_entry(name, value, path, data_start) for name, value in document.items()]
    _check_tiling(entries, path, data_start, file_size)
    entries.sort(key=lambda e: (e.begin, e.end))
    return Header(path, {e.name: e for e in entries}, metadata)


def _decode_json(text: bytes, path: Path) -> dict:
    def unique_keys(pairs: list[tuple[str, object]]) -> dict:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            duplicate = next(k for k in keys if keys.count(k) > 1)
            raise BridgeError(f"{path}: header names {duplicate!r} twice; expected unique tensor names")
        return dict(pairs)

    try:
        document = json.loads(text.decode("utf-8"), object_pairs_hook=unique_keys)
    except UnicodeDecodeError as err:
        raise BridgeError(f"{path}: header byte {err.start} is not UTF-8; expected a JSON header") from None
    except json.JSONDecodeError as err:
        raise BridgeError(f"{path}: header is not JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except ValueError as err:  # e.g. an integer literal longer than Python converts
        raise BridgeError(f"{path}: header JSON cannot be parsed ({err})") from None
    except RecursionError:
        raise BridgeError(f"{path}: header JSON nests too deeply; expected a flat object of tensors") from None
    if not isinstance(document, dict):
        raise BridgeError(f"{path}: header is a JSON {type(document).__name__}, expected an object of tensors")
    return document


def _metadata(value: object, path: Path) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise BridgeError(f"{path}: {METADATA_KEY} is {_show(value)}; expected an object of strings")
    return value


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(name: str, value: object, path: Path, data_start: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(value, dict):
        raise BridgeError(f"{where} is described by {_show(value)}; expected an object with dtype, shape, data_offsets")
    code, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(code, str) or code not in BITS:
        raise BridgeError(f"{where} has dtype {_show(code)}; expected one of {', '.join(BITS)}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise BridgeError(f"{where} has shape {_show(shape)}; expected a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise BridgeError(f"{where} has data_offsets {_show(offsets)}; expected [begin, end] non-negative integers")
    begin, end = offsets
    expected = data_bytes(code, tuple(shape))
    if expected is None:
        raise BridgeError(f"{where}: {math.prod(shape)} {code} values do not fill whole bytes")
    if end < begin or end - begin != expected:
        raise BridgeError(
            f"{where} has data_offsets [{begin}, {end}]; expected {expected} bytes for {code} shape {shape}"
        )
    return TensorEntry(name, code, tuple(shape), data_start + begin, data_start + end)


def _check_tiling(entries: list[TensorEntry], path: Path, data_start: int, file_size: int) -> None:
    """Tensors must cover the data section exactly, back to back, as safetensors requires."""
    position = data_start
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            problem = "overlaps the tensor before it" if entry.begin < position else "leaves a gap before it"
            raise BridgeError(
                f"{path}: tensor {entry.name!r} at data offset {entry.begin - data_start} {problem};"
                f" expected it at {position - data_start}"
            )
        position = entry.end
    if position != file_size:
        raise BridgeError(
            f"{path}: tensors end at byte {position} but the file has {file_size} bytes;"
            " expected the data section to be covered exactly (truncated or corrupt file)"
        )


def _show(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header for tensors laid out back to back in the given order.

    As safetensors writes it: compact JSON, metadata first, the header padded with spaces so the data
    section starts at a multiple of 8.
    """
    document: dict[str, object] = {METADATA_KEY: metadata}
    offset = 0
    for name, code, shape in entries:
        size = data_bytes(code, shape)
        document[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text
