"""FP8 block-scaled releases (DeepSeek-V3 / Qwen3.5-FP8 layout) as input, for every family.

The releases are made by transformers' own FP8 quantizer (``Fp8Quantize``, which runs on a CPU) from
each family's tiny checkpoint, in blocks of 16 so that the tiny linears hold several blocks; the
dequantized reference is transformers' own ``Fp8Dequantize``. Checked: release -> import (in memory,
and offline at TP2 / EP2, so ranks read partial blocks) -> ``export --quant fp8-block`` is the
release bit for bit (weights, scales, config); a plain export holds exactly transformers'
dequantized weights; a changed block gets a fresh scale and only it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cli_runner import run_cli
from safetensors.torch import load_file, save_file
from transformers import FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

from bridgecore.compare import compare_checkpoints
from bridgecore.errors import BridgeError
from bridgecore.plugins import installed
from bridgecore.testing import write_tiny
from bridgecore_quant import export_fp8, export_fp8_block, numerics

BLOCK = [16, 16]
#: tiny model -> its plugin
MODELS = {"step35": "step35", "step37": "step37", "qwen35-dense": "qwen35", "qwen35-moe": "qwen35"}
#: left in bf16, as the releases' modules_to_not_convert leave them (embeddings, head, routers, GDN's
#: small projections and convolution, Step's head gate); norms and other 1-dim tensors never tile
KEPT = ("embed_tokens", "lm_head", "conv1d", ".gate.", "in_proj_a", "in_proj_b", "shared_expert_gate", "g_proj")
DEQUANTIZE = Fp8Dequantize(None)


def quantizer() -> Fp8Quantize:
    return Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=BLOCK)))


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out |= load_file(file)
    return out


def make_release(name: str, out: Path, scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The FP8 release of tiny model ``name``: its linears quantized by transformers, two shards."""
    if MODELS[name] not in installed().infos:
        pytest.skip(f"plugin {MODELS[name]} is not installed here")
    src = write_tiny(MODELS[name], name, out.parent / f"{out.name}-bf16")
    tensors, fp8 = load_dir(src), quantizer()
    release: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(".weight") and value.dim() >= 2 and not any(k in key for k in KEPT):
            release |= fp8._quantize_one(key, value)
        else:
            release[key] = value
    release = {k: v.to(scale_dtype) if k.endswith("_scale_inv") else v for k, v in release.items()}
    assert sum(v.dtype == torch.float8_e4m3fn for v in release.values()) >= 8
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": BLOCK,
        "modules_to_not_convert": ["lm_head", "model.embed_tokens"],
    }
    out.mkdir()
    names = list(release)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):
        save_file({n: release[n].contiguous() for n in part}, out / f"model-0000{i + 1}-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {n: f"model-0000{1 + (n in names[half:])}-of-00002.safetensors" for n in names},
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return release


def ok(*args: str, nproc: int = 1) -> str:
    done = run_cli(*map(str, args), nproc=nproc)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def exact(src: Path, dst: Path) -> None:
    report = compare_checkpoints(src, dst)
    bad = [r for r in report.rows if r.status != "exact"]
    assert not bad and report.config_equal, (bad[:3], report.config_equal)


#: the offline import's layout per family; the default run has one dense and one MoE family at
#: TP2/EP2 (ranks reading partial blocks) and round trips the other two in memory (below)
CASES = [
    pytest.param("step35", ["--tp", "2", "--ep", "2"]),
    pytest.param("qwen35-moe", ["--tp", "2", "--ep", "2"]),
    pytest.param("step37", ["--tp", "2"], marks=pytest.mark.slow),
    pytest.param("qwen35-dense", ["--tp", "2"], marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "layout"), CASES)
def test_release_imports_and_exports_itself_bit_for_bit(tmp_path: Path, name: str, layout: list[str]) -> None:
    release, megatron = tmp_path / "release", tmp_path / "megatron"
    tensors = make_release(name, release, torch.bfloat16 if name == "qwen35-moe" else torch.float32)
    ok("import", release, megatron, "--offline", *layout)
    record = json.loads((megatron / "bridgecore.json").read_text())
    assert "quantization_config" not in record["hf_config"] and record["quantization"]["weight_block_size"] == BLOCK
    ok("export", megatron, tmp_path / "fp8", "--quant", "fp8-block")
    exact(release, tmp_path / "fp8")

    # a plain export is the dequantized model: transformers' own dequantization of every weight
    ok("export", megatron, tmp_path / "plain", "--offline")
    plain = load_dir(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert set(plain) == {k for k in tensors if not k.endswith("_scale_inv")}
    for key, value in plain.items():
        if tensors[key].dtype == torch.float8_e4m3fn:
            scales = tensors[key.removesuffix("weight") + "weight_scale_inv"]
            expected = DEQUANTIZE._dequantize_one(tensors[key], scales, torch.bfloat16)
        else:
            expected = tensors[key]
        assert value.dtype == expected.dtype and torch.equal(value.view(torch.uint8), expected.view(torch.uint8)), key


def test_in_memory_import_at_tp2_keeps_the_scales_too(tmp_path: Path) -> None:
    make_release("qwen35-dense", tmp_path / "release")
    ok("import", tmp_path / "release", tmp_path / "megatron", "--tp", "2", nproc=2)
    assert sorted(p.name for p in (tmp_path / "megatron" / "quantized").iterdir()) == ["model.safetensors"]
    ok("export", tmp_path / "megatron", tmp_path / "fp8", "--quant", "fp8-block")
    exact(tmp_path / "release", tmp_path / "fp8")
    # a checkpoint without bridgecore's record (a training run's) takes the release's scales from --hf-config
    (tmp_path / "megatron" / "bridgecore.json").unlink()
    shutil.rmtree(tmp_path / "megatron" / "quantized")
    ok("export", tmp_path / "megatron", tmp_path / "again", "--quant", "fp8-block", "--hf-config", tmp_path / "release")
    exact(tmp_path / "release", tmp_path / "again")


@pytest.mark.parametrize("name", ["step37", "qwen35-dense"])
def test_roundtrip_of_a_release_compares_it_in_its_own_format(tmp_path: Path, name: str) -> None:
    make_release(name, tmp_path / "release")
    out = ok("roundtrip", tmp_path / "release", "--keep", tmp_path / "again")
    assert "tensors identical: bit-exact" in out, out
    exact(tmp_path / "release", tmp_path / "again")


def test_a_changed_block_gets_a_fresh_scale_and_the_others_keep_theirs() -> None:
    weight = (torch.randn(48, 40, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    codes, kept = numerics.fp8_block_quantize(weight, None, (16, 16), torch.float32)
    trained = DEQUANTIZE._dequantize_one(codes[:48, :32], kept[:, :2], torch.bfloat16)  # whole blocks
    trained = torch.cat([trained, weight[:, 32:]], dim=1)
    trained[20, 5] = trained[16:32, :16].abs().max() * 2  # one weight of block (1, 0) grew beyond its range
    _, scales = numerics.fp8_block_quantize(trained, kept, (16, 16), torch.float32)
    changed = (scales != kept).nonzero().tolist()
    assert changed == [[1, 0]]
    assert scales[1, 0] == trained[16:32, :16].float().abs().max() / 448


def test_export_fp8_block_needs_a_model_imported_from_a_release(tmp_path: Path) -> None:
    if "qwen35" not in installed().infos:
        pytest.skip("plugin qwen35 is not installed here")
    with pytest.raises(BridgeError, match="this model has none; import from the FP8 release"):
        export_fp8_block(write_tiny("qwen35", "qwen35-dense", tmp_path / "bf16"), tmp_path / "fp8")
    assert not (tmp_path / "fp8").exists()


def test_modelopt_formats_refuse_a_release_s_block_scales(tmp_path: Path) -> None:
    make_release("qwen35-dense", tmp_path / "release")
    with pytest.raises(BridgeError, match=r"weight_scale_inv\) of an FP8 release; .*--quant fp8-block"):
        export_fp8(tmp_path / "release", tmp_path / "out")


def test_inspect_shows_the_quantization(tmp_path: Path) -> None:
    make_release("qwen35-moe", tmp_path / "release")
    lines = ok("inspect", tmp_path / "release").splitlines()
    summary = next(line for line in lines if line.startswith("quantization"))
    assert "FP8 block-scaled" in summary and "blocks 16x16" in summary and "dequantized to bfloat16" in summary
    assert "  model.layers.*.mlp.experts.*.gate_proj.weight" in lines
    assert "  model.layers.*.linear_attn.in_proj_a.weight" not in lines
