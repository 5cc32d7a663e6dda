"""compressed-tensors FP8 checkpoints (llm-compressor's ``FP8`` / ``FP8_DYNAMIC``) as input.

The checkpoints are made by the compressed-tensors library itself (its scale computation and its
``FloatQuantizationCompressor``) from tiny checkpoints of two families, with per-channel scales on
some linears and one per-tensor scale on the others (two config groups); the reference is the
library's own decompression. Import at TP2 then a plain export gives exactly those weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import load_file

from bridgecore.errors import BridgeError
from bridgecore.plugins import installed
from bridgecore.testing import write_tiny
from bridgecore.tiny import write_checkpoint
from bridgecore_quant import export_fp8_block

MODELS = {"qwen35-dense": "qwen35", "step37": "step37"}
#: left unquantized, as llm-compressor recipes ignore them (embeddings, head, routers, GDN, head gate)
IGNORED = ("embed_tokens", "lm_head", ".gate.", "linear_attn", "g_proj", "shared_expert_gate", "moe.")


def scheme(strategy: str) -> QuantizationScheme:
    weights = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False)
    inputs = QuantizationArgs(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out |= load_file(file)
    return out


def make_checkpoint(name: str, out: Path) -> tuple[dict[str, torch.Tensor], dict[str, QuantizationScheme]]:
    """Tiny model ``name`` compressed by the library: channel scales on even linears, a tensor scale on odd."""
    if MODELS[name] not in installed().infos:
        pytest.skip(f"plugin {MODELS[name]} is not installed here")
    src = write_tiny(MODELS[name], name, out.parent / f"{out.name}-bf16")
    tensors, schemes, compressed = load_dir(src), {}, {}
    linears = [k for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 2 and "norm" not in k]
    for i, key in enumerate(k for k in linears if not any(part in k for part in IGNORED)):
        schemes[key] = scheme("channel" if i % 2 == 0 else "tensor")
        weight = tensors[key]
        if i % 2 == 0:
            low, high = weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
        else:
            low, high = weight.amin().reshape(1), weight.amax().reshape(1)
        scale, zero = calculate_qparams(low.clamp(max=0), high.clamp(min=0), schemes[key].weights)
        state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero}
        module = key.removesuffix("weight")
        compressed |= {module + k: v for k, v in FloatQuantizationCompressor.compress(state, schemes[key]).items()}
    assert len(schemes) >= 8
    out_tensors = {k: v for k, v in tensors.items() if k not in schemes} | compressed
    config = json.loads((src / "config.json").read_text())
    groups = {"group_0": scheme("channel"), "group_1": scheme("tensor")}
    quantization = QuantizationConfig(
        config_groups=groups, format="float-quantized", quantization_status="compressed", ignore=["lm_head"]
    )
    config["quantization_config"] = json.loads(json.dumps(quantization.to_dict(), default=str))
    write_checkpoint(out, config, out_tensors)
    return out_tensors, schemes


def ok(*args: object) -> str:
    done = run_cli(*map(str, args))
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("name", ["qwen35-dense", pytest.param("step37", marks=pytest.mark.slow)])
def test_import_gives_the_library_s_own_decompression(tmp_path: Path, name: str) -> None:
    tensors, schemes = make_checkpoint(name, tmp_path / "ct")
    ok("import", tmp_path / "ct", tmp_path / "megatron", "--offline", "--tp", "2")
    ok("export", tmp_path / "megatron", tmp_path / "plain", "--offline")
    plain = load_dir(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert set(plain) == {k for k in tensors if not k.endswith(".weight_scale")}
    for key, value in plain.items():
        if key in schemes:
            module = key.removesuffix("weight")
            state = {"weight": tensors[key], "weight_scale": tensors[module + "weight_scale"]}
            expected = FloatQuantizationCompressor.decompress(state, schemes[key])["weight"].to(torch.bfloat16)
        else:
            expected = tensors[key]
        assert value.dtype == expected.dtype and torch.equal(value.view(torch.uint8), expected.view(torch.uint8)), key


def test_what_bridgecore_does_not_write_back_is_said(tmp_path: Path) -> None:
    make_checkpoint("qwen35-dense", tmp_path / "ct")
    lines = ok("inspect", tmp_path / "ct").splitlines()
    summary = next(line for line in lines if line.startswith("quantization"))
    assert "FP8 compressed-tensors (float-quantized, e4m3, scales per channel, tensor" in summary, summary
    assert "written again" not in summary
    done = run_cli("roundtrip", str(tmp_path / "ct"))
    assert done.returncode != 0 and "is read, not written, by bridgecore" in done.stderr, done.stderr
    with pytest.raises(BridgeError, match='this model was imported from a "compressed-tensors" checkpoint'):
        export_fp8_block(tmp_path / "ct", tmp_path / "fp8")  # what an export of its import stages
    assert not (tmp_path / "fp8").exists()
