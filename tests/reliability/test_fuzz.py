"""Fuzzing safetensors headers and config.json: a clean one-line error or success, never another
exception, never a hang (each example runs under a wall-clock alarm)."""

from __future__ import annotations

import json
import shutil
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from reliability_support import Result

from bridgecore.errors import BridgeError
from bridgecore.hf.dtypes import BITS
from bridgecore.hf.header import parse_header
from bridgecore.hf.reader import CheckpointReader

Cli = Callable[..., Result]
EXAMPLE_SECONDS = 20


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail the example instead of hanging: SIGALRM raises in the main thread after `seconds`."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"example ran past {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_one_line(err: BridgeError) -> None:
    assert str(err) and "\n" not in str(err)


counts = st.one_of(st.integers(-3, 300), st.sampled_from([0, 2**31, 2**63, 2**64 + 5, 10**40]))
weird = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=5), st.lists(st.integers(), max_size=2)
)
tensor_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(list(BITS)), st.text(max_size=6), weird),
        "shape": st.one_of(st.lists(counts, max_size=3), weird),
        "data_offsets": st.one_of(st.lists(counts, min_size=0, max_size=3), weird),
    },
)
header_document = st.dictionaries(st.text(max_size=8), st.one_of(tensor_entry, weird), max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    document=header_document,
    data_size=st.integers(0, 4096),
    metadata=st.one_of(st.none(), weird, st.dictionaries(st.text(max_size=3), st.text(max_size=3))),
)
def test_fuzzed_headers_are_parsed_or_refused_in_one_line(
    tmp_path: Path, document: dict, data_size: int, metadata: object
) -> None:
    if metadata is not None:
        document = {"__metadata__": metadata, **document}
    text = json.dumps(document).encode()
    raw = struct.pack("<Q", len(text)) + text + b"\0" * data_size
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw)
    with time_limit(EXAMPLE_SECONDS):
        try:
            header = parse_header(raw, path, len(raw))
        except BridgeError as err:
            assert_one_line(err)
            return
        # A header that parses describes readable data: every tensor reads back with its declared shape.
        with CheckpointReader(tmp_path) as reader:
            for name, entry in header.entries.items():
                try:
                    assert tuple(reader.read(name).shape) == entry.shape
                except BridgeError as err:  # packed sub-byte dtypes are validated but not read
                    assert_one_line(err)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_fuzzed_bytes_are_refused_in_one_line(raw: bytes, length: int | None) -> None:
    data = raw if length is None else struct.pack("<Q", length) + raw
    with time_limit(EXAMPLE_SECONDS):
        try:
            parse_header(data, Path("fuzz.safetensors"), len(data))
        except BridgeError as err:
            assert_one_line(err)


#: the keys the example plugin reads, each with sizes that are wrong in type or value.
SIZE_KEYS = [
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
]
bad_size = st.one_of(st.integers(-4, 0), st.sampled_from([1, 3, 7]), weird, st.just("64"), st.just(64.0))
#: huge values only for widths: the fuzz builds on the meta device (no memory), but the layer count
#: is a loop and the head dim sizes a real rotary table.
huge_width = st.sampled_from([2**31, 10**12, 2**63])
MISSING = object()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bridgecore.testing import write_tiny

    return write_tiny("llama_example", "llama-example", tmp_path_factory.mktemp("fuzz") / "hf")


def test_unfuzzed_config_inspects(cli: Cli, checkpoint: Path) -> None:
    # The baseline of the config fuzz: without it every example could fail for an unrelated reason.
    assert cli("inspect", checkpoint).returncode == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    changes=st.dictionaries(
        st.sampled_from(SIZE_KEYS + ["tie_word_embeddings", "dtype", "rms_norm_eps", "architectures"]),
        st.one_of(bad_size, st.just(MISSING)),
        min_size=1,
        max_size=3,
    ),
    width=st.one_of(
        st.none(), st.tuples(st.sampled_from(["hidden_size", "intermediate_size", "vocab_size"]), huge_width)
    ),
)
# null sizes once reached megatron-core's constructors and failed there with a TypeError
@example(changes={"vocab_size": None}, width=None)
@example(changes={"hidden_size": None}, width=None)
def test_fuzzed_config_is_inspected_or_refused_in_one_line(
    cli: Cli, checkpoint: Path, tmp_path: Path, changes: dict, width: tuple[str, int] | None
) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    for key, value in changes.items():
        if value is MISSING:
            config.pop(key, None)
        else:
            config[key] = value
    if width is not None:
        config[width[0]] = width[1]
    hf_dir = tmp_path / "hf"
    if not hf_dir.exists():  # tmp_path is shared by the examples of one test run
        shutil.copytree(checkpoint, hf_dir)
    (hf_dir / "config.json").write_text(json.dumps(config))
    with time_limit(EXAMPLE_SECONDS):
        result = cli("inspect", hf_dir)
    if result.returncode != 0:
        result.error_line()
