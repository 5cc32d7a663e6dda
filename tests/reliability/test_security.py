"""Hostile checkpoints run nothing: no pickle is unpickled, no remote code imported, no path escapes,
no header-driven allocation."""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from reliability_support import Result, siblings

from bridgecore.errors import BridgeError
from bridgecore.hf.header import parse_header

Cli = Callable[..., Result]


class WritesMarker:
    """Unpickling this writes the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.system, (f"touch {self.marker}",))


def hostile_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": WritesMarker(marker)}))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_only_checkpoint_is_refused_unread(cli: Cli, llama_dir: Path, tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    for shard in llama_dir.glob("model*.safetensors*"):
        shard.unlink()
    hostile_pickle(llama_dir / name, marker)
    line = cli("import", llama_dir, tmp_path / "out").error_line()
    assert "holds only pickle weights" in line and "loading them can run code" in line
    assert not marker.exists() and siblings(tmp_path / "out") == []


def test_pickle_beside_safetensors_is_ignored_and_not_copied(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile_pickle(llama_dir / "pytorch_model.bin", marker)
    assert cli("roundtrip", llama_dir, "--keep", tmp_path / "out").returncode == 0
    assert not marker.exists() and not (tmp_path / "out" / "pytorch_model.bin").exists()


@pytest.fixture
def remote_code_dir(llama_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint whose config asks for custom code that would write a marker when imported."""
    marker = tmp_path / "remote-code-ran"
    config = json.loads((llama_dir / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    (llama_dir / "config.json").write_text(json.dumps(config))
    for module in ("configuration_evil", "modeling_evil"):
        (llama_dir / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('{module}')\n")
    return llama_dir, marker


def test_remote_code_is_never_imported_or_copied(cli: Cli, remote_code_dir: tuple[Path, Path], tmp_path: Path) -> None:
    hf_dir, marker = remote_code_dir
    megatron, exported, kept = tmp_path / "megatron", tmp_path / "exported", tmp_path / "kept"
    for args in (
        ("inspect", hf_dir),
        ("import", hf_dir, megatron),
        ("export", megatron, exported),
        ("roundtrip", hf_dir, "--keep", kept),
        ("verify", hf_dir),
    ):
        result = cli(*args)
        assert result.returncode == 0, (args, result.stderr[-2000:])
        assert not marker.exists(), args
    copied = [p for d in (megatron, exported, kept) for p in d.rglob("*.py")]
    assert copied == []
    assert json.loads((exported / "config.json").read_text())["auto_map"]  # carried as data, never followed


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../model-00001-of-00002.safetensors"])
def test_index_paths_cannot_leave_the_checkpoint(cli: Cli, llama_dir: Path, tmp_path: Path, shard: str) -> None:
    index = llama_dir / "model.safetensors.index.json"
    document = json.loads(index.read_text())
    document["weight_map"]["model.norm.weight"] = shard
    index.write_text(json.dumps(document))
    line = cli("inspect", llama_dir).error_line()
    assert f"{index}: names shard {shard!r}; expected a plain file name inside the checkpoint directory" in line


def test_symlinked_shard_outside_is_refused(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    shard = llama_dir / "model-00002-of-00002.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    line = cli("inspect", llama_dir).error_line()
    assert f"{shard}: is a symlink to {outside}, outside the checkpoint directory" in line


@pytest.mark.parametrize("shape", [[10**15], [10**8, 10**7], [2**40, 2**40, 2**40]])
def test_huge_header_shape_fails_without_allocating(cli: Cli, llama_dir: Path, shape: list[int]) -> None:
    header = json.dumps(
        {"model.norm.weight": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4 * math.prod(shape)]}}
    ).encode()
    path = llama_dir / "model-00002-of-00002.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    rss = psutil.Process().memory_info().rss
    with pytest.raises(BridgeError, match="tensors end at byte .* but the file has"):
        parse_header(path.read_bytes(), path, path.stat().st_size)
    line = cli("inspect", llama_dir).error_line()
    assert str(path) in line and "truncated or corrupt" in line
    assert psutil.Process().memory_info().rss - rss < 200 * 2**20


def test_hostile_torch_dist_metadata_is_not_unpickled(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    """torch.distributed.checkpoint reads `.metadata` with plain pickle: bridgecore vets it first."""
    megatron, marker = tmp_path / "megatron", tmp_path / "pwned"
    assert cli("import", llama_dir, megatron).returncode == 0
    hostile_pickle(megatron / "release" / ".metadata", marker)
    line = cli("export", megatron, tmp_path / "out").error_line()
    assert "a pickle in the torch_dist checkpoint is not plain data" in line and "posix.system" in line
    assert not marker.exists() and siblings(tmp_path / "out") == []


def test_hostile_common_pt_is_not_unpickled(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    megatron, marker = tmp_path / "megatron", tmp_path / "pwned"
    assert cli("import", llama_dir, megatron).returncode == 0
    hostile_pickle(megatron / "release" / "common.pt", marker)
    line = cli("export", megatron, tmp_path / "out").error_line()
    assert "not plain data" in line and "Weights only load failed" in line
    assert not marker.exists()
