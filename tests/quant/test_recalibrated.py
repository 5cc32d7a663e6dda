"""An amax changed on the Megatron side after import reaches the export, fused quantizers included.

A user recalibrates (or trains quantization-aware) in Megatron: the fused quantizers (``linear_qkv``,
``linear_fc1``) get a new ``_amax`` while the per-linear values kept at import (``_amax_parts``) stay
as they were. Export must write the new value for every HF linear of such a group, and say which
groups; an unchanged group keeps its per-linear values. A checkpoint that never had ``_amax_parts``
(Megatron-LM with ModelOpt saves ``_amax`` only) exports the fused value for every linear.
Checked on the in-memory API, the offline export, ``--hf-config`` (the training-run path) and
``--quant fp8|nvfp4``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bridgecore import AutoBridge, export_hf_weights
from bridgecore.megatron import parallel

sys.path.insert(0, str(Path(__file__).parent))
from calibration import calibrate
from test_cli_e2e import PLUGINS, bridgecore, load_dir, write_llama

NEW = 0.75  # the recalibrated amax, unlike any calibrated one (those are |w| maxima or rand + 0.1)
#: layer 0's quantizers that the recalibration changes: two fused ones and an unfused one.
CHANGED = {
    "self_attention.linear_qkv.weight_quantizer": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.linear_fc1.input_quantizer": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.linear_fc2.weight_quantizer": ("mlp.down_proj",),
}


def _hf(megatron: str, module: str) -> str:
    return f"model.layers.0.{module}.{megatron.rsplit('.', 1)[1]}._amax"


def _recalibrated(hf: Path, out: Path, keep_parts: bool = True) -> torch.nn.Module:
    """Import ``hf``, set layer 0's ``CHANGED`` quantizers to ``NEW`` and save the Megatron checkpoint
    to ``out``; without ``keep_parts`` the fused quantizers' ``_amax_parts`` are dropped first, as a
    Megatron-LM run saves them. Returns the bridge and model, in memory."""
    bridge = AutoBridge.from_hf_pretrained(hf, plugin="llama_example")
    model = bridge.to_megatron_model()
    modules = dict(model[0].named_modules())
    for name in CHANGED:
        modules[f"decoder.layers.0.{name}"]._amax.fill_(NEW)
    if not keep_parts:
        for module in modules.values():
            module._buffers.pop("_amax_parts", None)
    bridge.save_megatron(model, out)
    return bridge, model


def _check(got: dict[str, torch.Tensor], source: dict[str, torch.Tensor], parts: bool) -> None:
    """Layer 0's changed groups have ``NEW`` on every linear; layer 1's fused groups keep each linear's
    own amax while ``parts`` are kept, else take the group's max."""
    for megatron, modules in CHANGED.items():
        for module in modules:
            name = _hf(megatron, module)
            assert got[name].dtype == source[name].dtype and got[name].item() == NEW, name
    qkv = [f"model.layers.1.self_attn.{p}_proj.weight_quantizer._amax" for p in "qkv"]
    assert len({source[n].item() for n in qkv}) == 3  # the calibration differs per linear
    for name in qkv:
        want = source[name] if parts else max(source[n] for n in qkv)
        assert torch.equal(got[name], want), name


@pytest.fixture
def calibrated(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    src = write_llama(tmp_path / "calibrated")
    return src, calibrate(src)


def test_in_memory_export_of_a_recalibrated_model(calibrated, tmp_path: Path, capfd) -> None:
    src, source = calibrated
    try:
        bridge, model = _recalibrated(src, tmp_path / "megatron")
        capfd.readouterr()
        bridge.save_hf_pretrained(model, tmp_path / "hf")
        saved = capfd.readouterr().out
        weights = dict(export_hf_weights(bridge, model))
        pairs = capfd.readouterr().out
    finally:
        parallel.leave()
    for got in (load_dir(tmp_path / "hf"), weights):
        _check(got, source, parts=True)
    for out in (saved, pairs):
        (note,) = [line for line in out.splitlines() if "changed after import" in line]
        assert note.startswith("note: ") and note.endswith(
            ": decoder.layers.0.mlp.linear_fc1.input_quantizer._amax,"
            " decoder.layers.0.self_attention.linear_qkv.weight_quantizer._amax"
        )


def test_offline_exports_of_a_recalibrated_checkpoint(calibrated, tmp_path: Path) -> None:
    src, source = calibrated
    try:
        _recalibrated(src, tmp_path / "megatron")
    finally:
        parallel.leave()
    out = bridgecore(PLUGINS["llama"], "export", str(tmp_path / "megatron"), str(tmp_path / "hf")).stdout
    _check(load_dir(tmp_path / "hf"), source, parts=True)
    assert "linear_qkv.weight_quantizer._amax" in next(line for line in out.splitlines() if "changed after" in line)
    for fmt, scale in (("fp8", 448), ("nvfp4", 6 * 448)):
        bridgecore(PLUGINS["llama"], "export", str(tmp_path / "megatron"), str(tmp_path / fmt), "--quant", fmt)
        got = load_dir(tmp_path / fmt)
        suffix = "weight_scale" if fmt == "fp8" else "weight_scale_2"
        for p in "qkv":
            assert got[f"model.layers.0.self_attn.{p}_proj.{suffix}"].item() == pytest.approx(NEW / scale, rel=1e-6)
        assert got["model.layers.0.mlp.down_proj." + suffix].item() == pytest.approx(NEW / scale, rel=1e-6)
        for p in ("gate_proj", "up_proj"):
            assert got[f"model.layers.0.mlp.{p}.input_scale"].item() == pytest.approx(NEW / scale, rel=1e-6)


def test_a_checkpoint_saved_without_parts_exports_the_fused_amax(calibrated, tmp_path: Path) -> None:
    src, source = calibrated
    try:
        _recalibrated(src, tmp_path / "megatron", keep_parts=False)
    finally:
        parallel.leave()
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(tmp_path / "megatron" / "release")).read_metadata().state_dict_metadata
    assert any(k.endswith("linear_qkv.weight_quantizer._amax") for k in saved)
    assert not any(k.endswith("_amax_parts") for k in saved)
    for args in ([], ["--hf-config", str(src)]):
        out_dir = tmp_path / f"hf{len(args)}"
        out = bridgecore(PLUGINS["llama"], "export", str(tmp_path / "megatron"), str(out_dir), *args).stdout
        _check(load_dir(out_dir), source, parts=False)
        assert any("keeps no per-linear amax" in line for line in out.splitlines()), out
    try:
        bridge = AutoBridge.from_megatron_checkpoint(tmp_path / "megatron")
        model = bridge.to_megatron_model(load_weights=False)
        bridge.load_megatron(model, tmp_path / "megatron")
        _check(dict(export_hf_weights(bridge, model)), source, parts=False)
    finally:
        parallel.leave()
