"""With NVIDIA ModelOpt itself: what it calibrates imports, and what bridgecore exports equals its export.

Tiny Qwen3.5 dense and MoE models are loaded with transformers and calibrated on CPU by
``mtq.quantize`` (``FP8_DEFAULT_CFG`` + ``FP8_KV_CFG``, and ``NVFP4_DEFAULT_CFG``; max calibration),
then written twice: by ``save_pretrained`` (bf16 weights and ``*_quantizer._amax``, the checkpoint
bridgecore imports) and by ModelOpt's ``export_hf_checkpoint`` (the reference). bridgecore imports the
first at TP 2 (x EP 2 for the MoE), round-trips it bit-exact and exports it with ``--quant``; every
tensor, its dtype and every ``hf_quant_config.json`` / ``quantization_config`` field must equal the
reference (the producer names the tool). MTP is off: transformers builds no MTP layers, so ModelOpt
never sees their weights.

The MoE's routed experts are transformers' fused experts: ModelOpt names their amax after the fused
modules (one weight amax per expert, one input amax shared by a layer's experts) while the weights
keep the checkpoint's per-expert names. Runs only where nvidia-modelopt is installed
(``nox -s tests-modelopt``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_cli_e2e import PLUGINS, bridgecore, load_dir, write_family_tiny

mtq = pytest.importorskip("modelopt.torch.quantization")
modelopt_export = pytest.importorskip("modelopt.torch.export")

CONFIGS = {"fp8": "FP8_DEFAULT_CFG", "nvfp4": "NVFP4_DEFAULT_CFG"}


def without_mtp(family: str, config: dict) -> dict:
    """``config`` with MTP off: transformers builds no MTP layers, so ModelOpt never sees their weights."""
    if family != "step37":
        return config | {"mtp_num_hidden_layers": 0}
    text = config["text_config"]
    per_layer = ("layer_types", "rope_theta", "partial_rotary_factors", "swiglu_limits", "swiglu_limits_shared")
    text |= {key: text[key][: text["num_hidden_layers"]] for key in per_layer} | {"num_nextn_predict_layers": 0}
    return config


def modelopt_calibrated(family: str, fmt: str, out: Path) -> tuple[Path, Path]:
    """(``save_pretrained`` dir, ``export_hf_checkpoint`` dir) of the tiny ``family`` calibrated by ModelOpt."""
    import transformers

    src = out / "source"
    write_family_tiny(family, src)
    config = without_mtp(family, json.loads((src / "config.json").read_text()))
    (src / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    # Step-3.7 is a vision-language model; its text-only forward calibrates the language model
    auto = transformers.Step3p7ForConditionalGeneration if family == "step37" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(src, dtype=torch.bfloat16)
    recipe = getattr(mtq, CONFIGS[fmt])
    if fmt == "fp8":
        recipe = mtq.update_quant_cfg_with_kv_cache_quant(recipe, mtq.FP8_KV_CFG["quant_cfg"])
    vocab = (config.get("text_config") or config)["vocab_size"]
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    model = mtq.quantize(model, recipe, lambda m: m(input_ids=tokens))
    model.save_pretrained(out / "saved")
    modelopt_export.export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out / "modelopt")
    return out / "saved", out / "modelopt"


#: (family, format) calibrated, and the layout the Megatron side runs at: TP 2, and EP 2 for the MoE.
CASES = [("qwen35-dense", "fp8"), ("qwen35-dense", "nvfp4"), ("qwen35-moe", "fp8"), ("qwen35-moe", "nvfp4")]
LAYOUT = {"qwen35-dense": ["--tp", "2"], "qwen35-moe": ["--tp", "2", "--ep", "2"]}


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{fmt}" for f, fmt in CASES])
def calibrated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path, Path]:
    family, fmt = request.param
    saved, reference = modelopt_calibrated(family, fmt, tmp_path_factory.mktemp(f"modelopt-{family}-{fmt}"))
    return family, fmt, saved, reference


def assert_same_files(got: Path, want: Path) -> None:
    ours, theirs = load_dir(got), load_dir(want)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        mine = ours[name]
        assert (mine.dtype, mine.shape) == (tensor.dtype, tensor.shape), name
        bits = (lambda t: t.view(torch.uint8)) if tensor.element_size() == 1 else (lambda t: t)
        assert torch.equal(bits(mine), bits(tensor)), name
    ours_q, theirs_q = (json.loads((d / "hf_quant_config.json").read_text()) for d in (got, want))
    assert ours_q["producer"]["name"] == "bridgecore-quant" and theirs_q["producer"]["name"] == "modelopt"
    assert ours_q["quantization"] == theirs_q["quantization"]
    ours_c, theirs_c = (json.loads((d / "config.json").read_text())["quantization_config"] for d in (got, want))
    assert ours_c | {"producer": None} == theirs_c | {"producer": None}


def test_modelopt_checkpoint_roundtrips_bit_exact(calibrated, tmp_path: Path) -> None:
    family, fmt, saved, _ = calibrated
    out = tmp_path / "out"
    result = bridgecore(PLUGINS[family], "roundtrip", str(saved), *LAYOUT[family], "--keep", str(out), nproc=2)
    assert "bit-exact" in result.stdout
    # q/k/v and gate/up weight amax differ as ModelOpt calibrates each linear; GDN in_proj_a/b have none
    assert "amax groups differ" in result.stdout and "largest ratio" in result.stdout
    assert "in_proj_b.weight_quantizer._amax; its quantizer is" in result.stdout
    assert sorted(load_dir(out)) == sorted(load_dir(saved))
    if family == "qwen35-moe":
        # transformers' fused experts: one weight amax per expert, one input amax for all experts of a layer
        got = load_dir(out)
        assert "model.layers.0.mlp.experts.gate_up_proj_weight_quantizers.3._amax" in got
        assert "model.layers.0.mlp.experts.down_proj_input_quantizer._amax" in got


def test_export_equals_modelopt_export(calibrated, tmp_path: Path) -> None:
    family, fmt, saved, reference = calibrated
    plugins = PLUGINS[family]
    bridgecore(plugins, "import", str(saved), str(tmp_path / "megatron"), *LAYOUT[family], nproc=2)
    bridgecore(plugins, "export", str(tmp_path / "megatron"), str(tmp_path / fmt), "--quant", fmt)
    assert_same_files(tmp_path / fmt, reference)


def test_export_straight_from_the_calibrated_checkpoint_equals_modelopt(calibrated, tmp_path: Path) -> None:
    from bridgecore_quant.formats import export

    family, fmt, saved, reference = calibrated
    assert_same_files(export(fmt, saved, tmp_path / fmt), reference)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_step37_roundtrips_and_its_fused_experts_export_is_refused(fmt: str, tmp_path: Path) -> None:
    """Step-3.7 keeps its released layout on save (stacked ``moe.*`` expert weights) while ModelOpt's
    expert amax keep transformers' names (``mlp.experts.*``): import and round trip map them; the
    deployable export of those experts is refused in one line (ModelOpt's own export writes
    transformers' in-memory names, per expert, which bridgecore does not)."""
    saved, _ = modelopt_calibrated("step37", fmt, tmp_path)
    assert "model.layers.2.mlp.experts.gate_up_proj_input_quantizer._amax" in load_dir(saved)
    plugins, out = PLUGINS["step37"], tmp_path / "out"
    result = bridgecore(plugins, "roundtrip", str(saved), "--tp", "2", "--ep", "2", "--keep", str(out), nproc=2)
    assert "bit-exact" in result.stdout
    assert sorted(load_dir(out)) == sorted(load_dir(saved))
    bridgecore(plugins, "import", str(saved), str(tmp_path / "megatron"), "--tp", "2", "--ep", "2", nproc=2)
    with pytest.raises(AssertionError) as failed:
        bridgecore(plugins, "export", str(tmp_path / "megatron"), str(tmp_path / fmt), "--quant", fmt)
    message = str(failed.value)
    assert "bridgecore: error: model.layers.2.mlp.experts." in message and "not supported" in message
    assert "Traceback" not in message
