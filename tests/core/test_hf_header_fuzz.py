"""Random and mutated safetensors headers: the reader either succeeds or raises a one-line BridgeError."""

import json
import struct
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from bridgecore.errors import BridgeError
from bridgecore.hf.header import parse_header
from bridgecore.hf.reader import CheckpointReader

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
VALID = save(
    {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)},
    metadata={"format": "pt"},
)


def _outcome(raw: bytes, path: Path) -> str:
    path.write_bytes(raw)
    try:
        with CheckpointReader(path.parent) as reader:
            names = reader.keys()
            for name in names:
                reader.read(name, ()).sum()
    except BridgeError as err:
        assert "\n" not in str(err) and "model.safetensors" in str(err)
        return "refused"
    return "read"


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes(tmp_path: Path, raw: bytes):
    _outcome(raw, tmp_path / "model.safetensors")


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_valid_file(tmp_path: Path, edits: list[tuple[int, int]]):
    raw = bytearray(VALID)
    for position, value in edits:
        raw[position] = value
    _outcome(bytes(raw), tmp_path / "model.safetensors")


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "U8", "F4", "F6_E2M3", "X9"]) | _json_values,
        "shape": st.lists(st.integers(-2, 2**40), max_size=4) | _json_values,
        "data_offsets": st.lists(st.integers(-2, 64), min_size=2, max_size=2) | _json_values,
    }
)


@FUZZ
@given(st.dictionaries(st.text(max_size=6), _entries | _json_values, max_size=4), st.integers(0, 64))
def test_structured_headers(tmp_path: Path, document: dict, data_size: int):
    text = json.dumps(document).encode()
    raw = struct.pack("<Q", len(text)) + text + bytes(data_size)
    if _outcome(raw, tmp_path / "model.safetensors") == "read":
        header = parse_header(raw, tmp_path / "model.safetensors", len(raw))
        assert sum(e.end - e.begin for e in header.entries.values()) == data_size
