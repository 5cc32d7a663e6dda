"""The in-memory paths fill the model's own memory: the import can take slices of the source as params,
the export reads the torch_dist chunks straight into the params (no per-chunk copy, no fc1 concatenation)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from bridgecore import AutoBridge
from bridgecore.megatron import parallel
from bridgecore.megatron.dcp import RELEASE


def _import(hf: Path, out: Path, share_source: bool) -> dict[str, str]:
    """Import ``hf`` into ``out``; then add 1 to every param and return the source files' digests."""
    bridge = AutoBridge.from_hf_pretrained(hf)
    try:
        model = bridge.to_megatron_model(load_weights=False)
        bridge.load_hf_weights(model, share_source=share_source)
        bridge.save_megatron(model, out)
        with torch.no_grad():
            for chunk in model:
                for param in chunk.parameters():
                    param.add_(1)
    finally:
        parallel.leave()
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(hf.glob("*.safetensors"))}


def _saved(ckpt: Path) -> dict[str, object]:
    out = ckpt.parent / f"{ckpt.name}.pt"
    dcp_to_torch_save(ckpt / RELEASE, out)
    return torch.load(out, weights_only=False)


def test_import_sharing_the_source_saves_the_same_and_never_writes_the_source(llama_dir: Path, tmp_path: Path) -> None:
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(llama_dir.glob("*.safetensors"))}
    assert _import(llama_dir, tmp_path / "shared", share_source=True) == before
    _import(llama_dir, tmp_path / "copied", share_source=False)
    shared, copied = _saved(tmp_path / "shared"), _saved(tmp_path / "copied")
    assert shared.keys() == copied.keys()
    for key, value in copied.items():
        if isinstance(value, torch.Tensor):
            assert shared[key].dtype == value.dtype and torch.equal(shared[key], value), key


def test_export_load_reads_into_the_params_without_copies(llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    _import(llama_dir, tmp_path / "megatron", share_source=False)
    bridge = AutoBridge.from_megatron_checkpoint(tmp_path / "megatron")
    try:
        model = bridge.to_megatron_model(load_weights=False)
        params = {name: (p, p.data_ptr()) for name, p in model[0].named_parameters()}
        assert any(name.endswith("linear_fc1.weight") for name in params)  # a gated fc1: a factory merge
        copies: list[str] = []
        cat, load = torch.cat, torch.load

        def counted_cat(*args, **kwargs):
            copies.append("torch.cat")
            return cat(*args, **kwargs)

        def counted_load(f, *args, **kwargs):
            # DCP's reader unpickles every tensor chunk from its file slice into new memory on the CPU
            # (the saved objects, ``_extra_state``, are bytes, loaded without a map_location; the common
            # state that megatron-core 0.19 keeps in the files is read whole into a BytesIO)
            chunk = not isinstance(f, (str, os.PathLike, io.BytesIO))
            if chunk and kwargs.get("map_location") not in (None, "meta"):
                copies.append("torch.load of a chunk")
            return load(f, *args, **kwargs)

        monkeypatch.setattr(torch, "cat", counted_cat)
        monkeypatch.setattr(torch, "load", counted_load)
        bridge.load_megatron(model, tmp_path / "megatron")
        monkeypatch.undo()
        assert copies == []
        assert all(p.data_ptr() == ptr for p, ptr in params.values())
        bridge.save_hf_pretrained(model, tmp_path / "exported")
    finally:
        parallel.leave()
    for source in sorted(llama_dir.glob("*.safetensors")):
        assert (tmp_path / "exported" / source.name).read_bytes() == source.read_bytes(), source.name
