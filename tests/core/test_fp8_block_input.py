"""FP8 block-scaled checkpoints read dequantized, and every other quantization refused by name.

References independent of the reader: transformers' own ``Fp8Dequantize`` for grids that tile the
weight, and element-by-element indexing (``q[i, j] * s[i // bm, j // bn]``) for partial edge blocks and
every slice a TP/EP rank may ask for.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers.integrations.finegrained_fp8 import Fp8Dequantize

from bridgecore import AutoBridge
from bridgecore.errors import BridgeError
from bridgecore.hf.quantized import BlockFP8, DequantizedReader, amax_of
from bridgecore.tiny import write_checkpoint

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "dtype": "bfloat16"}


def fp8_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = lambda *shape: (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)  # noqa: E731
    return {
        "experts.weight": codes(3, 40, 56),  # partial edge blocks: scales [3, 3, 4]
        "experts.weight_scale_inv": torch.rand(3, 3, 4, generator=g) / 100,
        "proj.weight": codes(32, 48),  # whole blocks: scales [2, 3]
        "proj.weight_scale_inv": torch.rand(2, 3, generator=g).to(torch.bfloat16),
        "norm.weight": torch.ones(32, dtype=torch.bfloat16),
    }


def elementwise(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(q.shape[-2]) // 16
    cols = torch.arange(q.shape[-1]) // 16
    return (q.float() * s.float()[..., rows[:, None], cols[None, :]]).to(torch.bfloat16)


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = fp8_tensors()
    write_checkpoint(tmp_path / "ckpt", {**LLAMA, "quantization_config": FP8}, tensors)
    return tmp_path / "ckpt", tensors


def test_weights_read_as_transformers_dequantizes_them(checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, t = checkpoint
    with DequantizedReader(path, BlockFP8.parse(FP8, "test"), torch.bfloat16) as reader:
        assert sorted(reader.keys()) == ["experts.weight", "norm.weight", "proj.weight"]
        assert sorted(reader.scales()) == ["experts.weight_scale_inv", "proj.weight_scale_inv"]
        assert reader.dtype("proj.weight") == torch.bfloat16 and reader.dtype("norm.weight") == torch.bfloat16
        expected = Fp8Dequantize(None)._dequantize_one(t["proj.weight"], t["proj.weight_scale_inv"], torch.bfloat16)
        assert torch.equal(reader.read("proj.weight", ()).view(torch.int16), expected.view(torch.int16))
        experts = reader.read("experts.weight", ())
        assert torch.equal(
            experts.view(torch.int16), elementwise(t["experts.weight"], t["experts.weight_scale_inv"]).view(torch.int16)
        )
        assert torch.equal(reader.read("norm.weight", ()), t["norm.weight"])


def test_every_slice_reads_only_its_blocks_and_equals_the_whole(
    checkpoint: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, t = checkpoint
    whole = elementwise(t["experts.weight"], t["experts.weight_scale_inv"])
    rng = random.Random(0)
    with DequantizedReader(path, BlockFP8.parse(FP8, "test"), torch.bfloat16) as reader:
        for _ in range(60):
            r0 = rng.randrange(40)
            c0 = rng.randrange(56)
            index = (rng.randrange(3), slice(r0, rng.randrange(r0, 40) + 1), slice(c0, rng.randrange(c0, 56) + 1))
            if rng.random() < 0.3:
                index = (slice(0, 2), rng.randrange(40))
            before = reader.bytes_read
            part = reader.read("experts.weight", index)
            assert torch.equal(part.view(torch.int16), whole[index].view(torch.int16)), index
            # a row slice of one expert reads at most its blocks' rows of codes, and their scales
            if isinstance(index[1], slice):
                rows = index[1].stop - index[1].start + 30
                assert reader.bytes_read - before <= rows * 56 + 3 * 4 * 4, index


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        ({"quant_method": "gptq", "bits": 4}, None, 'quant_method "gptq" is not a quantization bridgecore reads'),
        ({"quant_method": "awq"}, None, 'quant_method "awq"'),
        ({"quant_method": "mxfp4"}, None, 'quant_method "mxfp4"'),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, None, 'compressed-tensors format "pack-quantized" is not read'),  # noqa: E501
        ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, None, 'ModelOpt quant_algo "NVFP4" is not read'),
        ({"quant_method": "modelopt", "quant_algo": "FP8", "algorithm": "awq"}, None, "quantization.algorithm"),
        ({"bits": 8}, None, "quantization_config without quant_method"),
        ({**FP8, "scale_fmt": "ue8m0"}, None, r"quantization_config.scale_fmt = \"ue8m0\" is not understood"),
        ({**FP8, "group_size": 64}, None, "quantization_config.group_size = 64 is not understood"),
        ({**FP8, "fmt": "e5m2"}, None, 'fmt "e5m2"; bridgecore reads "e4m3" only'),
        ({**FP8, "activation_scheme": "static"}, None, 'activation_scheme "static"'),
        ({**FP8, "weight_block_size": None}, None, "weight_block_size is null; expected two positive integers"),
        ({**FP8, "weight_block_size": [128]}, None, r"weight_block_size is \[128\]"),
        (None, None, "declares no quantization_config, but tensor 'experts.weight' is torch.float8_e4m3fn"),
        (FP8, {"proj.weight_scale_inv": None}, "float8_e4m3fn without its scales 'proj.weight_scale_inv'"),
        (FP8, {"proj.weight_scale_inv": torch.ones(2, 2)}, r"shape \[2, 2\], but 'proj.weight' \[32, 48\] needs scales of shape \[2, 3\]"),  # noqa: E501
        (FP8, {"norm.weight_scale_inv": torch.ones(1, 1)}, "a weight scale, but 'norm.weight' is not a float8_e4m3fn weight"),  # noqa: E501
        (FP8, {"proj.weight_scale_inv": torch.ones(2, 3, dtype=torch.uint8)}, r"torch.uint8; expected float scales"),
        (FP8, {"other.weight": torch.ones(16, 16).to(torch.float8_e5m2)}, "float8_e5m2; an FP8 checkpoint holds float8_e4m3fn"),  # noqa: E501
        (FP8, {"bias": torch.ones(16).to(torch.float8_e4m3fn)}, "expected a quantized linear's .weight"),
        (FP8, {"experts.weight": None, "experts.weight_scale_inv": None, "proj.weight": None, "proj.weight_scale_inv": None}, r"declares FP8 block-scaled \(.*\), but no weight is float8_e4m3fn"),  # noqa: E501
    ],
)  # fmt: skip
def test_quantizations_not_read_are_refused_by_name(
    tmp_path: Path, config: dict | None, tensors: dict | None, message: str
) -> None:
    found = fp8_tensors()
    for name, value in (tensors or {}).items():
        if value is None:
            del found[name]
        else:
            found[name] = value
    write_checkpoint(tmp_path / "ckpt", {**LLAMA, **({"quantization_config": config} if config else {})}, found)
    with pytest.raises(BridgeError, match=message) as err:
        AutoBridge.from_hf_pretrained(tmp_path / "ckpt")
    assert "\n" not in str(err.value) and str(tmp_path / "ckpt") in str(err.value)


def test_a_modelopt_export_is_read_by_its_own_file(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "ckpt", LLAMA, {"norm.weight": torch.ones(4, dtype=torch.bfloat16)})
    (tmp_path / "ckpt" / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
    with pytest.raises(BridgeError, match='hf_quant_config.json: ModelOpt quant_algo "NVFP4" is not read'):
        AutoBridge.from_hf_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "hf_quant_config.json").write_text("{")
    with pytest.raises(BridgeError, match="hf_quant_config.json: not valid JSON"):
        AutoBridge.from_hf_pretrained(tmp_path / "ckpt")


def test_amax_of_a_scale_divides_back_to_it_exactly() -> None:
    scales = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 10 / 448  # as ModelOpt divides
    assert torch.equal(amax_of(scales) / 448, scales)
    not_made = torch.tensor(0.0013203048147261143)  # no float32 divides by 448 to it
    with pytest.raises(BridgeError, match="x.input_scale: no float32 amax divides by 448"):
        amax_of(not_made, "x.input_scale")


def test_a_release_without_a_dtype_is_refused(tmp_path: Path) -> None:
    write_checkpoint(
        tmp_path / "ckpt", {"architectures": ["LlamaForCausalLM"], "quantization_config": FP8}, fp8_tensors()
    )
    with pytest.raises(BridgeError, match="names no dtype or torch_dtype; expected the dtype its FP8 weights"):
        AutoBridge.from_hf_pretrained(tmp_path / "ckpt")
