"""FP8 and NVFP4 export of a calibrated checkpoint: every weight dequantizes within its format's bound.

Bounds (s = the tensor's scale; E4M3 has 3 mantissa bits, so rounding a normal value moves it by at
most 2^-4 of itself, a subnormal one by at most half its 2^-9 spacing):
- FP8, with |w| <= amax: |w - deq| <= max(|w| / 16, s / 1024), s = amax / 448.
- NVFP4: within a block the E2M1 rounding moves w/(b·s2) by at most half a code gap, at most 1 (between
  4 and 6), and the E4M3-rounded block scale b at most shrinks by 1/(1+2^-4), which can push
  |w/(b·s2)| to 6·17/16 before it saturates at 6, also within 1: |w - deq| <= b·s2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bridgecore.errors import BridgeError
from bridgecore.tiny import write_checkpoint
from bridgecore_quant import numerics
from bridgecore_quant.formats import (
    exclude_patterns,
    export_fp8,
    export_nvfp4,
    shared_input_groups,
    unquantized_modules,
)

H, INTER, E, V = 64, 32, 4, 48
QUANTIZED = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.1.moe.gate_proj",
]


def write_calibrated(out: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)

    tensors = {
        "model.embed_tokens.weight": w(V, H),
        "model.layers.0.input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": w(H, H),
        "model.layers.0.self_attn.o_proj.weight": w(H, H),
        "model.layers.0.mlp.down_proj.weight": w(H, INTER),
        "model.layers.1.mlp.gate.weight": w(E, H),
        "model.layers.1.moe.gate_proj.weight": w(E, INTER, H),
        "lm_head.weight": w(V, H),
    }
    tensors["model.layers.0.self_attn.o_proj.weight"][0, :16] = 0  # an all-zero NVFP4 block
    for m in QUANTIZED:
        weight = tensors[f"{m}.weight"].float()
        stacked = weight.dim() == 3
        tensors[f"{m}.weight_quantizer._amax"] = weight.abs().amax(dim=(1, 2)) if stacked else weight.abs().amax()
        tensors[f"{m}.input_quantizer._amax"] = torch.rand((E,) if stacked else (), generator=g) + 1
    tensors["model.layers.0.self_attn.k_bmm_quantizer._amax"] = torch.tensor(3.5)
    tensors["model.layers.0.self_attn.v_bmm_quantizer._amax"] = torch.tensor(7.0)
    write_checkpoint(out, {"architectures": ["LlamaForCausalLM"], "hidden_size": H}, tensors, shards=2)
    (out / "tokenizer.json").write_text("{}")
    return tensors


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out |= load_file(file)
    return out


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    src = tmp_path_factory.mktemp("calibrated") / "ckpt"
    return src, write_calibrated(src)


def assert_fp8_within_bound(got: dict[str, torch.Tensor], source: dict[str, torch.Tensor], modules: list[str]) -> None:
    for m in modules:
        weight, amax = source[f"{m}.weight"].float(), source[f"{m}.weight_quantizer._amax"]
        assert got[f"{m}.weight"].dtype == torch.float8_e4m3fn and got[f"{m}.weight"].shape == weight.shape
        scale = got[f"{m}.weight_scale"]
        assert scale.dtype == torch.float32 and scale.shape == amax.shape
        assert torch.equal(scale, amax / 448)
        assert torch.equal(got[f"{m}.input_scale"], source[f"{m}.input_quantizer._amax"] / 448)
        deq = numerics.fp8_dequantize(got[f"{m}.weight"], scale)
        s = numerics._per_leading(scale, weight.dim())
        bound = torch.maximum(weight.abs() / 16, s / 1024) * (1 + 1e-6)
        assert bool(((weight - deq).abs() <= bound).all()), m
        assert not any(k.startswith(m + ".") and "quantizer" in k for k in got)


def group_max(source: dict[str, torch.Tensor], modules: list[str], quantizer: str) -> dict[str, torch.Tensor]:
    """Each module's amax as NVFP4 export uses it: the max over the linears that read its input."""
    out = {}
    for group in shared_input_groups(set(modules)):
        value = torch.stack([source[f"{m}.{quantizer}._amax"].float() for m in group]).amax(0)
        out |= {m: value for m in group}
    return out


def assert_nvfp4_within_bound(
    got: dict[str, torch.Tensor], source: dict[str, torch.Tensor], modules: list[str]
) -> None:
    weight_amax, input_amax = (group_max(source, modules, q) for q in ("weight_quantizer", "input_quantizer"))
    for m in modules:
        weight, amax = source[f"{m}.weight"].float(), weight_amax[m]
        packed, block, scale_2 = got[f"{m}.weight"], got[f"{m}.weight_scale"], got[f"{m}.weight_scale_2"]
        assert packed.dtype == torch.uint8 and packed.shape == (*weight.shape[:-1], weight.shape[-1] // 2)
        assert block.dtype == torch.float8_e4m3fn and block.shape == (*weight.shape[:-1], weight.shape[-1] // 16)
        assert torch.equal(scale_2, amax / (6 * 448))
        assert torch.equal(got[f"{m}.input_scale"], input_amax[m] / (6 * 448))
        deq = numerics.nvfp4_dequantize(packed, block, scale_2)
        unit = (block.float() * numerics._per_leading(scale_2, block.dim())).repeat_interleave(16, dim=-1)
        assert bool(((weight - deq).abs() <= unit * (1 + 1e-6)).all()), m
        # the bound is not vacuous: a unit is about a sixth of the block's largest magnitude
        blocks = weight.unflatten(-1, (-1, 16)).abs().amax(-1).repeat_interleave(16, dim=-1)
        assert bool(((unit <= blocks / 6 * 17 / 16 * (1 + 1e-6)) | (blocks == 0)).all()), m
        assert not any(k.startswith(m + ".") and "quantizer" in k for k in got)


def assert_quant_config(out: Path, fmt: str, exclude: list[str], kv_cache: bool, source_config: dict) -> None:
    """``hf_quant_config.json`` and ``config.json``'s ``quantization_config``, field by field."""
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())
    assert hf_quant["producer"] == {"name": "bridgecore-quant", "version": "0.4.0"}
    q = hf_quant["quantization"]
    expected = {
        "quant_algo": fmt.upper(),
        "kv_cache_quant_algo": "FP8" if kv_cache else None,
        "exclude_modules": exclude,
    }
    assert q == expected | ({"group_size": 16} if fmt == "nvfp4" else {})
    config = json.loads((out / "config.json").read_text())
    qc = config.pop("quantization_config")
    assert config == source_config
    bits = 4 if fmt == "nvfp4" else 8
    tensor = {"dynamic": False, "num_bits": bits, "type": "float"} | ({"group_size": 16} if fmt == "nvfp4" else {})
    expected_qc = {
        "quant_method": "modelopt",
        "quant_algo": fmt.upper(),
        "ignore": exclude,
        "config_groups": {"group_0": {"weights": tensor, "input_activations": tensor, "targets": ["Linear"]}},
        "producer": hf_quant["producer"],
    }
    if kv_cache:
        expected_qc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    assert qc == expected_qc


def test_fp8_dequantizes_within_bound(calibrated, tmp_path: Path) -> None:
    src, source = calibrated
    out = export_fp8(src, tmp_path / "fp8")
    got = load_dir(out)
    assert_fp8_within_bound(got, source, QUANTIZED)
    assert torch.equal(got["model.layers.0.self_attn.k_proj.k_scale"], torch.tensor(3.5 / 448))
    assert torch.equal(got["model.layers.0.self_attn.v_proj.v_scale"], torch.tensor(7.0 / 448))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"):
        assert torch.equal(got[name], source[name])
    assert (out / "tokenizer.json").exists()


def test_nvfp4_dequantizes_within_bound(calibrated, tmp_path: Path) -> None:
    src, source = calibrated
    got = load_dir(export_nvfp4(src, tmp_path / "nvfp4"))
    assert_nvfp4_within_bound(got, source, QUANTIZED)
    assert torch.equal(
        numerics.nvfp4_dequantize(
            got["model.layers.0.self_attn.o_proj.weight"][:1, :8],
            got["model.layers.0.self_attn.o_proj.weight_scale"][:1, :1],
            got["model.layers.0.self_attn.o_proj.weight_scale_2"],
        ),
        torch.zeros(1, 16),
    )


def test_output_is_sharded_with_an_index(calibrated, tmp_path: Path) -> None:
    src, source = calibrated
    out = export_nvfp4(src, tmp_path / "nvfp4", max_shard_size=4096)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in out.glob("*.safetensors"))
    got = load_dir(out)
    assert sorted(index["weight_map"]) == sorted(got)
    assert_nvfp4_within_bound(got, source, QUANTIZED)


def test_e2m1_rounds_to_nearest_with_ties_to_even() -> None:
    scaled = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.3, -2.9, 0.0])
    codes = numerics._e2m1_codes(scaled)
    values = numerics.E2M1_VALUES[codes.long() & 7] * torch.where(codes >= 8, -1.0, 1.0)
    assert values.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.5, -3.0, 0.0]


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_hf_quant_config_fields(calibrated, tmp_path: Path, fmt: str) -> None:
    src, _ = calibrated
    out = (export_fp8 if fmt == "fp8" else export_nvfp4)(src, tmp_path / fmt)
    # norms carry no quantizer; the router's parent holds nothing quantized, so a wildcard names it
    exclude = ["lm_head", "model.embed_tokens", "model.layers.1.mlp*"]
    assert_quant_config(out, fmt, exclude, True, {"architectures": ["LlamaForCausalLM"], "hidden_size": H})


def test_refuses_existing_output_and_uncalibrated_amax(calibrated, tmp_path: Path) -> None:
    src, source = calibrated
    (tmp_path / "taken").mkdir()
    with pytest.raises(BridgeError, match="already exists"):
        export_fp8(src, tmp_path / "taken")
    bad = tmp_path / "bad"
    tensors = dict(source) | {"model.layers.0.self_attn.q_proj.weight_quantizer._amax": torch.tensor(0.0)}
    write_checkpoint(bad, {"architectures": ["LlamaForCausalLM"]}, tensors, shards=1)
    with pytest.raises(BridgeError, match="q_proj.weight_quantizer._amax: amax .* is not positive"):
        export_nvfp4(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_fp8_divides_in_the_weight_dtype_as_modelopt_does(calibrated, tmp_path: Path) -> None:
    """A bf16 weight over a 0-dim fp32 scale is divided into bf16: the quotient is rounded twice."""
    src, source = calibrated
    got = load_dir(export_fp8(src, tmp_path / "fp8"))
    m = "model.layers.0.self_attn.q_proj"
    weight, scale = source[f"{m}.weight"], source[f"{m}.weight_quantizer._amax"].float() / 448
    twice = (weight.float() / scale).bfloat16().to(torch.float8_e4m3fn)
    once = (weight.float() / scale).to(torch.float8_e4m3fn)
    assert torch.equal(got[f"{m}.weight"].view(torch.uint8), twice.view(torch.uint8))
    assert not torch.equal(twice.view(torch.uint8), once.view(torch.uint8))  # the test tells them apart


def test_nvfp4_shared_input_groups_take_the_group_max(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    tensors: dict[str, torch.Tensor] = {}
    for i, p in enumerate("qkv"):
        m = f"model.layers.0.self_attn.{p}_proj"
        tensors[f"{m}.weight"] = (torch.randn(32, H, generator=g) * 0.05).to(torch.bfloat16)
        tensors[f"{m}.weight_quantizer._amax"] = tensors[f"{m}.weight"].float().abs().amax()
        tensors[f"{m}.input_quantizer._amax"] = torch.tensor(1.0 + i)
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(H, 32, dtype=torch.bfloat16)
    tensors["model.layers.0.self_attn.o_proj.weight_quantizer._amax"] = torch.tensor(0.5)
    tensors["model.layers.0.self_attn.o_proj.input_quantizer._amax"] = torch.tensor(9.0)
    write_checkpoint(tmp_path / "src", {"architectures": ["LlamaForCausalLM"]}, tensors, shards=1)
    got = load_dir(export_nvfp4(tmp_path / "src", tmp_path / "out"))
    qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    top = max(tensors[f"{m}.weight_quantizer._amax"] for m in qkv)
    for m in qkv:
        assert torch.equal(got[f"{m}.weight_scale_2"], top / (6 * 448))
        assert torch.equal(got[f"{m}.input_scale"], torch.tensor(3.0) / (6 * 448))
    o = "model.layers.0.self_attn.o_proj"
    assert torch.equal(got[f"{o}.input_scale"], torch.tensor(9.0) / (6 * 448))  # reads another input


def test_exclude_list_is_summarized_with_prefix_wildcards() -> None:
    quantized = {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj", "model.layers.10.mlp.up_proj"}
    unquantized = {
        "lm_head",
        "model.embed_tokens",
        "model.layers.0.linear_attn.conv1d",
        "model.layers.0.mlp.gate",
        "model.layers.1.mlp.gate",
        "model.visual.blocks.0.attn.qkv",
        "model.visual.merger.fc",
        "mtp.layers.0.mlp.gate_proj",
    }
    assert exclude_patterns(unquantized, quantized) == [
        "lm_head",
        "model.embed_tokens",
        "model.layers.0.linear_attn*",
        "model.layers.0.mlp.gate",
        "model.layers.1.*",  # `model.layers.1*` would cover model.layers.10
        "model.visual*",
        "mtp*",
    ]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (one-byte float dtypes compared as bytes: NaN and -0 count)."""
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return False
    a, b = (t.view(torch.uint8) if t.element_size() == 1 else t for t in (a, b))
    return torch.equal(a, b)


def write_fused_expert_amax(out: Path, stacked: bool) -> None:
    """One MoE layer whose experts carry ModelOpt's fused-experts amax (``mlp.experts.*``), with the
    expert weights stacked under the released layout's names (``moe.*``) or per expert."""
    g = torch.Generator().manual_seed(7)
    weights = {
        "gate_proj": (torch.randn(E, INTER, H, generator=g) * 0.05).to(torch.bfloat16),
        "up_proj": (torch.randn(E, INTER, H, generator=g) * 0.05).to(torch.bfloat16),
        "down_proj": (torch.randn(E, H, INTER, generator=g) * 0.05).to(torch.bfloat16),
    }
    tensors = {"model.layers.0.moe.gate.weight": torch.randn(E, H, generator=g).to(torch.bfloat16)}
    for leaf, weight in weights.items():
        if stacked:
            tensors[f"model.layers.0.moe.{leaf}.weight"] = weight
        else:
            tensors |= {f"model.layers.0.mlp.experts.{e}.{leaf}.weight": weight[e] for e in range(E)}
    experts = "model.layers.0.mlp.experts"
    for fused, amax in (("gate_up_proj", weights["gate_proj"].float().abs().amax((1, 2)) * 1.5), ("down_proj", None)):
        amax = weights[fused].float().abs().amax((1, 2)) if amax is None else amax
        tensors |= {f"{experts}.{fused}_weight_quantizers.{e}._amax": amax[e] for e in range(E)}
        tensors[f"{experts}.{fused}_input_quantizer._amax"] = torch.tensor(2.5)
    write_checkpoint(out, {"architectures": ["Step3p7ForConditionalGeneration"]}, tensors, shards=1)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_stacked_experts_with_fused_expert_amax_export_as_their_per_expert_form(fmt: str, tmp_path: Path) -> None:
    """Each expert's slab of a stacked weight is what the per-expert layout of the same weights and
    amax exports (the form checked against ModelOpt's own export in test_modelopt_interop.py); its
    scales are stacked ``[E]``, and every expert's input scale comes from the layer's one input amax."""
    export = export_fp8 if fmt == "fp8" else export_nvfp4
    for stacked in (True, False):
        write_fused_expert_amax(tmp_path / f"src-{stacked}", stacked)
    got = load_dir(export(tmp_path / "src-True", tmp_path / "stacked"))
    want = load_dir(export(tmp_path / "src-False", tmp_path / "per-expert"))
    suffixes = ("weight", "weight_scale", "input_scale") + (("weight_scale_2",) if fmt == "nvfp4" else ())
    for leaf in ("gate_proj", "up_proj", "down_proj"):
        for suffix in suffixes:
            slabs = got[f"model.layers.0.moe.{leaf}.{suffix}"]
            assert slabs.shape[0] == E, (leaf, suffix)
            for e in range(E):
                theirs = want[f"model.layers.0.mlp.experts.{e}.{leaf}.{suffix}"]
                assert same_bits(slabs[e], theirs), (leaf, suffix, e)
    assert not any("_quantizer" in k for k in got)
    assert json.loads((tmp_path / "stacked" / "hf_quant_config.json").read_text())["quantization"][
        "exclude_modules"
    ] == ["model.layers.0.moe.gate"]


def test_fused_expert_amax_without_expert_weights_is_refused(tmp_path: Path) -> None:
    write_fused_expert_amax(tmp_path / "src", stacked=True)
    tensors = load_dir(tmp_path / "src")
    del tensors["model.layers.0.moe.up_proj.weight"]
    write_checkpoint(tmp_path / "bad", {"architectures": ["Step3p7ForConditionalGeneration"]}, tensors, shards=1)
    with pytest.raises(BridgeError, match=r"gate_up_proj_weight_quantizers\.0\._amax: .* nor one stacked"):
        export_fp8(tmp_path / "bad", tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _Shapes:
    """A reader that knows only shapes: all unquantized_modules reads."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]


@pytest.mark.parametrize(
    ("config", "lm_head"),
    [
        ({"tie_word_embeddings": True}, True),
        ({"text_config": {"tie_word_embeddings": True}}, True),  # a VL config keeps it with the text model
        ({"tie_word_embeddings": False, "text_config": {"tie_word_embeddings": True}}, False),  # the top level wins
        ({}, False),
    ],
    ids=["tied", "tied-in-text-config", "top-level-wins", "untied"],
)
def test_unquantized_modules_are_the_other_matmuls_and_a_tied_head(config: dict, lm_head: bool) -> None:
    shapes = {
        "model.embed_tokens.weight": (V, H),
        "model.layers.0.input_layernorm.weight": (H,),  # a norm: no quantizer
        "model.layers.0.self_attn.q_proj.weight": (H, H),
        "model.layers.0.self_attn.q_proj.weight_quantizer._amax": (),
        "model.layers.0.mlp.down_proj.weight": (H, INTER),
        "model.visual.patch_embed.proj.weight": (8, 3, 2, 2),  # a convolution
        "model.layers.0.self_attn.q_proj.bias": (H,),
    }
    found = unquantized_modules(_Shapes(shapes), list(shapes), ["model.layers.0.self_attn.q_proj"], config)
    expected = {"model.embed_tokens", "model.layers.0.mlp.down_proj", "model.visual.patch_embed.proj"}
    assert found == expected | ({"lm_head"} if lm_head else set())
    # a head with its own tensor is listed as any other matmul, and only when it is not quantized
    with_head = {**shapes, "lm_head.weight": (V, H)}
    assert "lm_head" in unquantized_modules(_Shapes(with_head), list(with_head), [], config)
    assert "lm_head" not in unquantized_modules(_Shapes(with_head), list(with_head), ["lm_head"], config)


def test_json_side_files_are_indented_and_end_with_a_newline(calibrated, tmp_path: Path) -> None:
    src, _ = calibrated
    out = export_fp8(src, tmp_path / "fp8")
    for name in ("config.json", "hf_quant_config.json"):
        text = (out / name).read_text()
        assert text == json.dumps(json.loads(text), indent=2) + "\n", name
