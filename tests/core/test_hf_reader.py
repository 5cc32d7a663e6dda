import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bridgecore.errors import BridgeError
from bridgecore.hf.reader import CheckpointReader
from bridgecore.tiny import write_checkpoint


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "experts.down": torch.randn(4, 6, 8, generator=g),
        "norm.weight": torch.randn(8, generator=g).to(torch.float16),
        "steps": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scale": torch.randn(3, generator=g).to(torch.float8_e4m3fn),
    }


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


@pytest.fixture(params=[1, 3], ids=["single", "sharded"])
def checkpoint(tmp_path: Path, request) -> Path:
    write_checkpoint(tmp_path / "ckpt", {"architectures": ["Test"]}, _tensors(), shards=request.param)
    return tmp_path / "ckpt"


def test_reads_every_tensor_exactly(checkpoint: Path):
    tensors = _tensors()
    with CheckpointReader(checkpoint) as reader:
        assert sorted(reader.keys()) == sorted(tensors)
        for name, expected in tensors.items():
            assert reader.shape(name) == tuple(expected.shape)
            assert reader.dtype(name) == expected.dtype
            assert reader.nbytes(name) == expected.numel() * expected.element_size()
            assert reader.file_of(name).parent == checkpoint
            assert torch.equal(_bytes(reader.read(name, ())), _bytes(expected))


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("embed.weight", (slice(4, 8),)),
        ("embed.weight", (slice(None), slice(2, 5))),
        ("embed.weight", (-1,)),
        ("experts.down", (2,)),
        ("experts.down", (3, slice(1, 4), slice(6, None))),
        ("experts.down", (slice(1, 1),)),
    ],
)
def test_sliced_reads_count_only_the_slice(checkpoint: Path, name: str, index: tuple):
    expected = _tensors()[name][index]
    reader = CheckpointReader(checkpoint)
    part = reader.read(name, index)
    assert torch.equal(part, expected)
    assert reader.bytes_read == expected.numel() * expected.element_size() < reader.nbytes(name) or not expected.numel()


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        ((slice(0, 20),), "slice 0:20 on dim 0 is outside size 16"),
        ((16,), "index 16 on dim 0 is outside size 16"),
        ((slice(0, 8, 2),), "expected an int or a slice with step 1"),
        ((0, 0, 0), "has 3 entries for a 2-dim tensor"),
    ],
)
def test_bad_indexes(checkpoint: Path, index: tuple, expected: str):
    with pytest.raises(BridgeError, match=expected):
        CheckpointReader(checkpoint).read("embed.weight", index)


def test_unknown_tensor(checkpoint: Path):
    with pytest.raises(BridgeError, match="no tensor named 'nope'"):
        CheckpointReader(checkpoint).shape("nope")


def _write_file(path: Path, header: object, data: bytes, length: int | None = None) -> Path:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    ("header", "data", "length", "expected"),
    [
        (GOOD, b"\0" * 4, None, "tensors end at byte .* file has .* bytes"),
        (GOOD, b"\0" * 12, None, "tensors end at byte .* file has .* bytes"),
        (GOOD, b"", 10**9, "header length 1000000000 exceeds"),
        (GOOD, b"", 2000, "runs past the end"),
        (b"{not json", b"", None, "header is not JSON .* line 1 column 2"),
        (b"\xff\xfe", b"", None, "is not UTF-8"),
        ([1, 2], b"", None, "header is a JSON list"),
        (
            {"a": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "tensor 'a' has dtype \"F31\"",
        ),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "tensor 'a' has shape"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "expected 12 bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8, None, "data_offsets \\[0\\]"),
        ({**GOOD, "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, b"\0" * 8, None, "'b' .* overlaps"),
        ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, b"\0" * 8, None, "'a' .* leaves a gap"),
        ({"__metadata__": {"format": 1}, **GOOD}, b"\0" * 8, None, "__metadata__ is .* expected an object of strings"),
        (b'{"a": 1, "a": 2}', b"", None, "names 'a' twice"),
    ],
)
def test_corrupt_files_give_one_line_errors(tmp_path: Path, header, data: bytes, length, expected: str):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _write_file(ckpt / "model.safetensors", header, data, length)
    with pytest.raises(BridgeError, match=expected) as err:
        CheckpointReader(ckpt)
    assert "\n" not in str(err.value) and "model.safetensors" in str(err.value)


def test_truncated_file(tmp_path: Path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({"w": torch.ones(64, 64)}, ckpt / "model.safetensors")
    data = (ckpt / "model.safetensors").read_bytes()
    for cut in (3, 20, len(data) - 1):
        (ckpt / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(BridgeError, match="model.safetensors"):
            CheckpointReader(ckpt)


def _sharded(tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt, {}, _tensors(), shards=2)
    return ckpt


def _edit_index(ckpt: Path, edit) -> None:
    path = ckpt / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "..", "sub/model.safetensors"])
def test_index_paths_must_stay_inside(tmp_path: Path, target: str):
    ckpt = _sharded(tmp_path)
    _edit_index(ckpt, lambda wm: wm.update({"embed.weight": target}))
    with pytest.raises(BridgeError, match="expected a plain file name inside the checkpoint directory"):
        CheckpointReader(ckpt)


def test_symlinked_shard_outside_is_refused(tmp_path: Path):
    ckpt = _sharded(tmp_path)
    shard = ckpt / "model-00001-of-00002.safetensors"
    shard.rename(tmp_path / "elsewhere.safetensors")
    shard.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(BridgeError, match="is a symlink to .* outside the checkpoint directory"):
        CheckpointReader(ckpt)


def test_hub_cache_snapshot_symlinks_are_read(tmp_path: Path):
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    write_checkpoint(blobs, {}, _tensors(), shards=2)
    snapshot.mkdir(parents=True)
    for blob in blobs.iterdir():
        (snapshot / blob.name).symlink_to(Path("../../blobs") / blob.name)
    assert sorted(CheckpointReader(snapshot).keys()) == sorted(_tensors())


def test_missing_shard(tmp_path: Path):
    ckpt = _sharded(tmp_path)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(BridgeError, match="names shard 'model-00002-of-00002.safetensors', which is not a file"):
        CheckpointReader(ckpt)


def test_index_key_missing_from_shard(tmp_path: Path):
    ckpt = _sharded(tmp_path)
    _edit_index(ckpt, lambda wm: wm.update({"ghost": "model-00001-of-00002.safetensors"}))
    with pytest.raises(BridgeError, match="maps 'ghost' to model-00001-of-00002.safetensors, whose header"):
        CheckpointReader(ckpt)


def test_shard_tensor_missing_from_index(tmp_path: Path):
    ckpt = _sharded(tmp_path)
    _edit_index(ckpt, lambda wm: wm.pop("embed.weight"))
    with pytest.raises(BridgeError, match="holds 'embed.weight', which model.safetensors.index.json does not map"):
        CheckpointReader(ckpt)


def test_index_not_json(tmp_path: Path):
    ckpt = _sharded(tmp_path)
    (ckpt / "model.safetensors.index.json").write_text('{"weight_map": {\n')
    with pytest.raises(BridgeError, match="not JSON .* line 2 column 1"):
        CheckpointReader(ckpt)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt", "weights.pth"])
def test_pickle_checkpoints_are_refused(tmp_path: Path, name: str):
    (tmp_path / name).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(BridgeError, match="pickle checkpoints are not read"):
        CheckpointReader(tmp_path)


def test_empty_directory(tmp_path: Path):
    with pytest.raises(BridgeError, match="no model.safetensors or model.safetensors.index.json"):
        CheckpointReader(tmp_path)


def test_packed_sub_byte_dtype_is_validated_but_not_read(tmp_path: Path):
    _write_file(tmp_path / "model.safetensors", {"a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"ab")
    reader = CheckpointReader(tmp_path)
    assert reader.shape("a") == (4,)
    with pytest.raises(BridgeError, match="packed sub-byte dtype"):
        reader.read("a", ())
