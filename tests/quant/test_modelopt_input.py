"""ModelOpt FP8 real-quant exports as input: the calibrated model back, and the export again.

The exports are the quant plugin's own ``--quant fp8`` output of tiny calibrated checkpoints (the
writer the ``tests-modelopt`` session checks against ModelOpt 0.47's ``export_hf_checkpoint``):
per-tensor ``weight_scale`` (``[E]`` for Step-3.7's stacked experts), ``input_scale`` and the FP8
KV cache's ``k_scale`` / ``v_scale``, with ``hf_quant_config.json``. Import reads each weight
dequantized (E4M3 times its scale in float32, rounded to bf16, as the plugin's own decoder) and each
scale as the amax it came from, so ``export --quant fp8`` writes the export again bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from calibration import calibrate
from cli_runner import run_cli
from safetensors.torch import load_file

from bridgecore.compare import compare_checkpoints
from bridgecore.plugins import installed
from bridgecore.testing import write_tiny
from bridgecore_quant import export_fp8, export_nvfp4, numerics

PLUGIN = {"qwen35-moe": "qwen35", "step37": "step37"}


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out |= load_file(file)
    return out


def modelopt_export(name: str, out: Path, fmt: str = "fp8") -> Path:
    if PLUGIN[name] not in installed().infos:
        pytest.skip(f"plugin {PLUGIN[name]} is not installed here")
    calibrated = write_tiny(PLUGIN[name], name, out.parent / f"{out.name}-calibrated")
    calibrate(calibrated)
    (export_fp8 if fmt == "fp8" else export_nvfp4)(calibrated, out)
    return out


#: the scale ModelOpt's export made from each kind of amax
SCALES = {
    ".weight_quantizer._amax": ".weight_scale",
    ".input_quantizer._amax": ".input_scale",
    ".k_bmm_quantizer._amax": ".k_proj.k_scale",
    ".v_bmm_quantizer._amax": ".v_proj.v_scale",
}


def scale_of(amax: str) -> str:
    suffix = next(s for s in SCALES if amax.endswith(s))
    return amax.removesuffix(suffix) + SCALES[suffix]


def ok(*args: object) -> str:
    done = run_cli(*map(str, args))
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_an_export_imports_as_its_calibrated_model_and_exports_again(tmp_path: Path) -> None:
    release = modelopt_export("qwen35-moe", tmp_path / "fp8")
    ok("import", release, tmp_path / "megatron", "--offline", "--tp", "2", "--ep", "2")
    ok("export", tmp_path / "megatron", tmp_path / "again", "--quant", "fp8")
    report = compare_checkpoints(release, tmp_path / "again")
    assert all(r.status == "exact" for r in report.rows) and report.config_equal
    assert (release / "hf_quant_config.json").read_text() == (tmp_path / "again" / "hf_quant_config.json").read_text()

    # a plain export is the calibrated model: dequantized weights and the amax, no quantization config
    ok("export", tmp_path / "megatron", tmp_path / "plain", "--offline")
    plain, stored = load_dir(tmp_path / "plain"), load_dir(release)
    assert not (tmp_path / "plain" / "hf_quant_config.json").exists()
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    checked = 0
    for key, value in plain.items():
        if key.endswith("_quantizer._amax"):
            assert torch.equal(value / numerics.E4M3_MAX, stored[scale_of(key)]), key
            checked += 1
        elif stored[key].dtype == torch.float8_e4m3fn:
            expected = numerics.fp8_dequantize(stored[key], stored[key.removesuffix("weight") + "weight_scale"])
            assert torch.equal(value, expected.to(torch.bfloat16)), key
        else:
            assert torch.equal(value, stored[key]), key
    assert checked > 20


def test_stacked_experts_round_trip(tmp_path: Path) -> None:
    release = modelopt_export("step37", tmp_path / "fp8")
    assert load_dir(release)["model.layers.3.moe.gate_proj.weight_scale"].shape == (4,)
    assert "tensors identical: bit-exact" in ok("roundtrip", release)


def test_nvfp4_is_refused_by_name(tmp_path: Path) -> None:
    release = modelopt_export("step37", tmp_path / "nvfp4", fmt="nvfp4")
    done = run_cli("import", str(release), str(tmp_path / "megatron"))
    assert done.returncode != 0 and 'ModelOpt quant_algo "NVFP4" is not read' in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "megatron").exists()
