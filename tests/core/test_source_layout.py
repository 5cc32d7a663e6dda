"""Export restores the source's files: the same shard names, split, tensor order and index.

A source whose files the record does not know (a ``bridgecore.json`` written before files were
kept) is sharded by ``--max-shard-size`` with an index, as ``save_pretrained`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli

from bridgecore.compare import compare_checkpoints
from bridgecore.errors import BridgeError
from bridgecore.hf.reader import INDEX_FILE, CheckpointReader
from bridgecore.hf.writer import ShardedWriter
from bridgecore.plan.source import SourceMeta

PLUGINS = "llama_example"


def _weights(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("model*"))}


def test_roundtrip_restores_the_source_shards_and_index(llama_dir: Path, tmp_path: Path) -> None:
    assert (llama_dir / INDEX_FILE).is_file() and len(list(llama_dir.glob("*.safetensors"))) == 2
    out = tmp_path / "out"
    result = run_cli("roundtrip", str(llama_dir), "--keep", str(out), plugins=PLUGINS)
    assert result.returncode == 0, result.stderr[-2000:]
    # the same files, byte for byte: names, split, tensor order in each file and in the index
    assert _weights(out) == _weights(llama_dir)


def test_an_explicit_max_shard_size_is_honoured(llama_dir: Path, tmp_path: Path) -> None:
    """It was silently ignored whenever the source's files were restored."""
    out = tmp_path / "out"
    result = run_cli("roundtrip", str(llama_dir), "--keep", str(out), "--max-shard-size", "20KB", plugins=PLUGINS)
    assert result.returncode == 0, result.stderr[-2000:]
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert all(p.stat().st_size <= 20_000 + 4096 for p in out.glob("*.safetensors"))
    assert compare_checkpoints(llama_dir, out).exact


def test_a_record_without_files_is_sharded_by_size(llama_dir: Path, tmp_path: Path) -> None:
    megatron, out = tmp_path / "megatron", tmp_path / "out"
    assert run_cli("import", str(llama_dir), str(megatron), plugins=PLUGINS).returncode == 0
    record = json.loads((megatron / "bridgecore.json").read_text())
    assert all(len(row) == 5 for row in record["source"])
    record["source"] = [row[:3] for row in record["source"]]  # as bridgecore wrote it before keeping files
    (megatron / "bridgecore.json").write_text(json.dumps(record))
    result = run_cli("export", str(megatron), str(out), "--max-shard-size", "20KB", plugins=PLUGINS)
    assert result.returncode == 0, result.stderr[-2000:]
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    assert sorted(set(index.values())) == files
    assert compare_checkpoints(llama_dir, out).exact


def test_source_record_keeps_files_and_index_order(llama_dir: Path) -> None:
    source = SourceMeta.of(CheckpointReader(llama_dir))
    document = json.loads((llama_dir / INDEX_FILE).read_text())
    index = document["weight_map"]
    assert source.files == index and list(source.files) == list(index)
    assert source.index_metadata == document["metadata"]
    again = SourceMeta.from_json(json.loads(json.dumps(source.to_json())), source.index_metadata)
    assert again == source and list(again.files) == list(index)
    old = SourceMeta.from_json([row[:3] for row in source.to_json()])
    assert old.tensors == source.tensors and old.files == {} and old.files_of(list(old.tensors)) is None


@pytest.mark.parametrize("file", ["../model.safetensors", ".hidden.safetensors", "model.bin"])
def test_writer_refuses_a_file_name_that_is_not_a_plain_shard(tmp_path: Path, file: str) -> None:
    with pytest.raises(BridgeError, match="expected a plain NAME.safetensors file name"):
        ShardedWriter(tmp_path / "out", [("w", (2,), torch.float32)], files={"w": file})
