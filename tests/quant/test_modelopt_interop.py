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
keep the checkpoint's per-expert names. Step-3.7 (and Step-3.5, its language model) keeps its
stacked experts under the released names; ModelOpt's export writes transformers' in-memory names,
so the comparison reads bridgecore's export through that name map. Runs only where nvidia-modelopt
is installed (``nox -s tests-modelopt``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_cli_e2e import PLUGINS, bridgecore, load_dir, write_family_tiny
from test_formats import same_bits

from bridgecore.tiny import write_checkpoint

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


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert same_bits(ours[name], tensor), (name, ours[name].dtype, tensor.dtype)


def assert_same_files(got: Path, want: Path) -> None:
    assert_same_tensors(load_dir(got), load_dir(want))
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


#: Step-3.7's released names -> the in-memory names of transformers' Step3p7ForConditionalGeneration
#: (its conversion mapping ``step3p7``, text part), which ModelOpt's export writes for this model: its
#: quant-aware reverse of that mapping gives up on the stacked experts' concatenation.
IN_MEMORY = (
    (re.compile(r"^model\.(embed_tokens|layers|norm)\."), r"model.language_model.\1."),
    (re.compile(r"\.moe\.gate\.weight$"), ".mlp.gate.weight"),
    (re.compile(r"\.moe\.router_bias$"), ".mlp.gate.e_score_correction_bias"),
    (re.compile(r"\.share_expert\."), ".mlp.shared_experts."),
)
STACKED = re.compile(r"model\.layers\.(?P<layer>\d+)\.moe\.(?P<leaf>(gate|up|down)_proj)\.(?P<suffix>\w+)")
#: the vision tower and projector, which transformers also re-lays out on load (q/k/v split, 2D-rope
#: permutation): in the released layout, and as ModelOpt writes them.
VISION = ("vision_model.", "vit_large_projector.")
MODELOPT_VISION = ("model.vision_model.", "model.multi_modal_projector.")


def in_memory_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A released-layout text model's tensors under the names ModelOpt's export writes: a stacked
    expert tensor ``[E, ...]`` as ``E`` per-expert ones, the others renamed."""
    out = {}
    for name, tensor in tensors.items():
        if found := STACKED.fullmatch(name):
            prefix = f"model.language_model.layers.{found['layer']}.mlp.experts"
            out |= {f"{prefix}.{e}.{found['leaf']}.{found['suffix']}": slab for e, slab in enumerate(tensor)}
            continue
        for pattern, replacement in IN_MEMORY:
            name = pattern.sub(replacement, name)
        out[name] = tensor
    return out


def in_memory_module(module: str) -> str:
    """An ``exclude_modules`` entry of the released layout under ModelOpt's names for Step-3.7."""
    for released, in_memory in zip(VISION, MODELOPT_VISION, strict=True):
        if module.startswith(released.rstrip(".")):
            return in_memory.rstrip(".") + module.removeprefix(released.rstrip("."))
    return next(iter(in_memory_names({f"{module}.weight": torch.empty(0)}))).removesuffix(".weight")


def quantization(path: Path) -> dict:
    return json.loads((path / "hf_quant_config.json").read_text())["quantization"]


def step35_from_step37(saved: Path, out: Path) -> Path:
    """Step-3.5's released layout from a calibrated Step-3.7: its language model (transformers'
    Step-3.5 decoder class, ``Step3p7TextModel``, the one transformers has) under the same names,
    with the Step-3.5 config of that text config; the vision tower and projector left out."""
    from bridgecore_step35.tiny import TINY_CONFIG

    tensors = {k: v for k, v in load_dir(saved).items() if not k.startswith(VISION)}
    # the config ModelOpt's model was loaded from (transformers re-saves it in its own form)
    text = json.loads((saved.parent / "source" / "config.json").read_text())["text_config"]
    config = {**TINY_CONFIG, **text, "architectures": TINY_CONFIG["architectures"], "model_type": "step3p5"}
    write_checkpoint(out, config, tensors, shards=1)
    return out


@pytest.fixture(scope="module", params=["fp8", "nvfp4"])
def step37_calibrated(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Path]:
    fmt = request.param
    saved, reference = modelopt_calibrated("step37", fmt, tmp_path_factory.mktemp(f"modelopt-step37-{fmt}"))
    return fmt, saved, reference


@pytest.mark.parametrize("family", ["step37", "step35"])
def test_step_family_export_equals_modelopt_export_under_its_names(
    step37_calibrated, family: str, tmp_path: Path
) -> None:
    """Step-3.7 keeps its released layout on save (stacked ``moe.*`` expert weights) while ModelOpt's
    expert amax keep transformers' names (``mlp.experts.*``): import and round trip at TP 2 x EP 2
    are bit-exact, and ``export --quant`` equals ModelOpt's export tensor by tensor once each stacked
    expert tensor is read as its per-expert slabs and the rest under transformers' in-memory names
    (which ModelOpt's export writes for this model, and bridgecore does not). Step-3.5 is Step-3.7's
    language model in its own released layout, compared with the text part of the same export."""
    fmt, saved, reference = step37_calibrated
    if family == "step35":
        saved = step35_from_step37(saved, tmp_path / "step35")
    assert "model.layers.2.mlp.experts.gate_up_proj_input_quantizer._amax" in load_dir(saved)
    plugins, out = PLUGINS[family], tmp_path / "out"
    result = bridgecore(plugins, "roundtrip", str(saved), "--tp", "2", "--ep", "2", "--keep", str(out), nproc=2)
    assert "bit-exact" in result.stdout
    assert sorted(load_dir(out)) == sorted(load_dir(saved))
    bridgecore(plugins, "import", str(saved), str(tmp_path / "megatron"), "--tp", "2", "--ep", "2", nproc=2)
    bridgecore(plugins, "export", str(tmp_path / "megatron"), str(tmp_path / fmt), "--quant", fmt)
    ours, theirs = load_dir(tmp_path / fmt), load_dir(reference)
    assert_same_tensors(
        in_memory_names({k: v for k, v in ours.items() if not k.startswith(VISION)}),
        {k: v for k, v in theirs.items() if not k.startswith(MODELOPT_VISION)},
    )

    def ours_mapped(modules: list[str]) -> list[str]:
        return sorted(in_memory_module(m) for m in modules)

    def theirs_here(modules: list[str]) -> list[str]:  # Step-3.5 has no vision tower
        vision = tuple(v.rstrip(".") for v in MODELOPT_VISION)
        return sorted(m for m in modules if family == "step37" or not m.startswith(vision))

    ours_q, theirs_q = quantization(tmp_path / fmt), quantization(reference)
    ours_q["exclude_modules"] = ours_mapped(ours_q["exclude_modules"])
    theirs_q["exclude_modules"] = theirs_here(theirs_q["exclude_modules"])
    assert ours_q == theirs_q
    ours_c, theirs_c = (
        json.loads((d / "config.json").read_text())["quantization_config"] for d in (tmp_path / fmt, reference)
    )
    ours_c |= {"producer": None, "ignore": ours_mapped(ours_c["ignore"])}
    assert ours_c == theirs_c | {"producer": None, "ignore": theirs_here(theirs_c["ignore"])}
    if family == "step35":
        return
    # the vision tower: bridgecore's as read (unquantized, released layout), ModelOpt's as transformers holds it
    import transformers

    source = load_dir(saved)
    assert all(torch.equal(ours[k], source[k]) for k in ours if k.startswith(VISION))
    held = transformers.Step3p7ForConditionalGeneration.from_pretrained(saved, dtype=torch.bfloat16).state_dict()
    vision = {k: v for k, v in theirs.items() if k.startswith(MODELOPT_VISION)}
    assert vision and all(torch.equal(v, held[k]) for k, v in vision.items())
