"""The offline and in-memory paths execute one conversion plan: side by side on every tiny model.

For each tiny model of every installed plugin: the offline import and the in-memory import write
the same torch_dist checkpoint (tensor by tensor, with the same ``passthrough/``), and the offline
and in-memory exports of it write the same files, byte for byte, which are the source's own files.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from bridgecore import AutoBridge
from bridgecore.megatron import parallel
from bridgecore.megatron.dcp import PASSTHROUGH, RELEASE
from bridgecore.offline import stream_to_hf, stream_to_megatron
from bridgecore.plugins import installed

TINY_MODELS = [t for found in installed().call_all("tiny_models") for t in (found or [])]


def _saved(ckpt: Path, scratch: Path) -> dict[str, object]:
    """Every saved tensor and object of a torch_dist checkpoint, by key."""
    out = scratch / f"{ckpt.name}.pt"
    dcp_to_torch_save(ckpt / RELEASE, out)
    return torch.load(out, weights_only=False)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _import_in_memory(hf: Path, out: Path) -> None:
    bridge = AutoBridge.from_hf_pretrained(hf)
    try:
        bridge.save_megatron(bridge.to_megatron_model(), out)
    finally:
        parallel.leave()


def _export_in_memory(ckpt: Path, out: Path) -> None:
    bridge = AutoBridge.from_megatron_checkpoint(ckpt)
    try:
        model = bridge.to_megatron_model(load_weights=False)
        bridge.load_megatron(model, ckpt)
        bridge.save_hf_pretrained(model, out)
    finally:
        parallel.leave()


def _equal_saved(offline: dict[str, object], memory: dict[str, object]) -> None:
    assert offline.keys() == memory.keys()
    for key, value in memory.items():
        other = offline[key]
        if isinstance(value, torch.Tensor):
            assert other.dtype == value.dtype and other.shape == value.shape, key
            assert torch.equal(other, value), key
        elif isinstance(value, io.BytesIO):
            assert other.getvalue() == value.getvalue(), key
        else:
            assert other == value, key


@pytest.mark.parametrize("tiny", TINY_MODELS, ids=lambda t: t.name)
def test_offline_and_in_memory_paths_agree(tiny, tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    tiny.write(hf)
    stream_to_megatron(AutoBridge.from_hf_pretrained(hf), tmp_path / "offline")
    _import_in_memory(hf, tmp_path / "memory")
    _equal_saved(_saved(tmp_path / "offline", tmp_path), _saved(tmp_path / "memory", tmp_path))
    kept = [(tmp_path / ckpt / PASSTHROUGH).is_dir() for ckpt in ("offline", "memory")]
    assert kept[0] == kept[1]
    if kept[0]:
        assert _files(tmp_path / "offline" / PASSTHROUGH) == _files(tmp_path / "memory" / PASSTHROUGH)

    stream_to_hf(tmp_path / "offline", tmp_path / "hf-offline")
    _export_in_memory(tmp_path / "memory", tmp_path / "hf-memory")
    exported = _files(tmp_path / "hf-offline")
    assert exported == _files(tmp_path / "hf-memory")
    # the source's own shard files and index, byte for byte
    source = {name: data for name, data in _files(hf).items() if name.startswith("model")}
    assert {name: exported[name] for name in source if name in exported} == source
    assert {name for name in exported if name.startswith("model")} == source.keys()
