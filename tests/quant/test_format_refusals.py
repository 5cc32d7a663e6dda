"""Every refusal of the FP8/NVFP4 export, with its whole message, and that nothing is written.

Each case is a calibrated checkpoint with one thing wrong; the export must stop with a line that names
the tensor and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bridgecore.errors import BridgeError
from bridgecore.tiny import write_checkpoint
from bridgecore_quant.formats import exclude_patterns, export, export_fp8, export_nvfp4, shared_input_groups

H, INTER, E = 32, 32, 4
Q = "model.layers.0.self_attn.q_proj"
EXPERTS = "model.layers.0.mlp.experts"


def calibrated(**changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One quantized linear (q_proj) and one unquantized; ``changes`` replace (None: drop) tensors."""
    g = torch.Generator().manual_seed(5)
    tensors = {
        "model.embed_tokens.weight": torch.randn(16, H, generator=g).bfloat16(),
        f"{Q}.weight": torch.randn(H, H, generator=g).bfloat16(),
        f"{Q}.weight_quantizer._amax": torch.tensor(2.5),
        f"{Q}.input_quantizer._amax": torch.tensor(1.5),
    }
    for name, tensor in changes.items():
        name = name.replace("__", ".")
        if tensor is None:
            tensors.pop(name)
        else:
            tensors[name] = tensor
    return tensors


def refused(tmp_path: Path, tensors: dict[str, torch.Tensor], fmt: str = "fp8") -> str:
    src, out = tmp_path / "src", tmp_path / "out"
    write_checkpoint(src, {"architectures": ["LlamaForCausalLM"]}, tensors)
    with pytest.raises(BridgeError) as caught:
        export(fmt, src, out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    return str(caught.value)


def amax_key(which: str) -> str:
    return f"{Q}.{which}_quantizer._amax"


def test_a_per_channel_amax_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, calibrated(**{amax_key("weight"): torch.full((H,), 2.0)}))
    assert message == (
        f"{amax_key('weight')}: shape [{H}]; FP8/NVFP4 export needs a per-tensor amax ([] or [1], [E] for"
        " stacked experts), not a per-channel or per-block one"
    )


def test_an_uncalibrated_amax_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, calibrated(**{amax_key("input"): torch.tensor([0.0])}))
    assert message == f"{amax_key('input')}: amax [0.0] is not positive; the quantizer was never calibrated"


def test_other_quantizer_state_is_refused(tmp_path: Path) -> None:
    key = f"{Q}.weight_quantizer._pre_quant_scale"
    message = refused(tmp_path, calibrated(**{key: torch.ones(H)}))
    assert message == f"{key}: quantizer state other than amax cannot be exported to fp8"


def test_an_amax_without_its_weight_or_input_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, calibrated(**{f"{Q}.weight": None}))
    assert message == f"{amax_key('weight')}: the checkpoint has no {Q}.weight to quantize"
    message = refused(tmp_path, calibrated(**{amax_key("input"): None}))
    assert message == f"{amax_key('input')}: missing; weight-and-activation formats need the input amax too"


def test_nvfp4_needs_whole_blocks_of_input_features(tmp_path: Path) -> None:
    message = refused(tmp_path, calibrated(**{f"{Q}.weight": torch.ones(H, 24, dtype=torch.bfloat16)}), "nvfp4")
    assert message == f"{Q}.weight: 24 input features do not split into NVFP4 blocks of 16"


def stacked_experts(**changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Step-3.7's stacked ``moe.gate_proj`` [E, out, in] with the amax ModelOpt names after transformers'
    fused experts, plus ``changes``."""
    tensors = calibrated()
    tensors["model.layers.0.moe.gate_proj.weight"] = torch.ones(E, INTER, H, dtype=torch.bfloat16)
    for e in range(E):
        tensors[f"{EXPERTS}.gate_proj_weight_quantizers.{e}._amax"] = torch.tensor(1.0 + e)
    tensors[f"{EXPERTS}.gate_proj_input_quantizer._amax"] = torch.tensor(3.0)
    for name, tensor in changes.items():
        if tensor is None:
            tensors.pop(name)
        else:
            tensors[name] = tensor
    return tensors


def test_stacked_expert_amax_must_cover_the_stacked_experts(tmp_path: Path) -> None:
    first = f"{EXPERTS}.gate_proj_weight_quantizers.0._amax"
    message = refused(tmp_path, stacked_experts(**{f"{EXPERTS}.gate_proj_weight_quantizers.3._amax": None}))
    assert (
        message
        == f"{first}: amax for experts [0, 1, 2], but the stacked model.layers.0.moe.gate_proj.weight holds 4 experts"
    )


def test_fused_expert_amax_needs_one_stacked_weight_in_its_layer(tmp_path: Path) -> None:
    first = f"{EXPERTS}.gate_proj_weight_quantizers.0._amax"
    lead = (
        f"{first}: amax of transformers' fused experts, but the checkpoint has neither per-expert"
        f" {EXPERTS}.{{e}}.gate_proj.weight nor one stacked [experts, out, in] gate_proj.weight in the same layer"
    )
    assert refused(tmp_path, stacked_experts(**{"model.layers.0.moe.gate_proj.weight": None})) == lead
    two = stacked_experts(**{"model.layers.0.shared.gate_proj.weight": torch.ones(E, INTER, H, dtype=torch.bfloat16)})
    assert (
        refused(tmp_path, two) == lead + " (found ['model.layers.0.moe.gate_proj', 'model.layers.0.shared.gate_proj'])"
    )


def test_a_stacked_weight_with_amax_of_both_kinds_is_refused(tmp_path: Path) -> None:
    module = "model.layers.0.moe.gate_proj"
    both = stacked_experts(
        **{f"{module}.weight_quantizer._amax": torch.ones(E), f"{module}.input_quantizer._amax": torch.ones(1)}
    )
    assert (
        refused(tmp_path, both)
        == f"{module}.weight_quantizer._amax: {module} also has amax of transformers' fused experts"
    )


@pytest.mark.parametrize("shape", [(E - 1,), (E, 2), (1, E)], ids=["fewer-experts", "per-channel", "transposed"])
def test_a_stacked_weight_takes_one_amax_per_expert_or_one_for_all(tmp_path: Path, shape: tuple[int, ...]) -> None:
    module = "model.layers.0.moe.gate_proj"
    tensors = calibrated()
    tensors[f"{module}.weight"] = torch.ones(E, INTER, H, dtype=torch.bfloat16)
    tensors[f"{module}.weight_quantizer._amax"] = torch.ones(shape)
    tensors[f"{module}.input_quantizer._amax"] = torch.ones(1)
    message = refused(tmp_path, tensors)
    assert message.startswith(
        f"{module}.weight_quantizer._amax: shape {list(shape)}; FP8/NVFP4 export needs a per-tensor"
    )
    for i, good in enumerate([(E,), (1,), ()]):
        tensors[f"{module}.weight_quantizer._amax"] = torch.ones(good)
        write_checkpoint(tmp_path / f"ok{i}", {"architectures": ["LlamaForCausalLM"]}, tensors)
        export("fp8", tmp_path / f"ok{i}", tmp_path / f"ok{i}-out")


def test_export_refuses_an_unknown_format_and_an_existing_output(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_checkpoint(src, {"architectures": ["LlamaForCausalLM"]}, calibrated())
    with pytest.raises(BridgeError) as refused:
        export("int4", src, tmp_path / "out")
    assert str(refused.value) == "--quant int4: unknown format; this plugin writes fp8, nvfp4"
    for write in (export_fp8, export_nvfp4):
        out = tmp_path / write.__name__
        out.mkdir()
        with pytest.raises(BridgeError, match="already exists"):
            write(src, out)
        write(src, out, overwrite=True)  # replaced whole
        assert (out / "hf_quant_config.json").is_file()
        config = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
        assert config["kv_cache_quant_algo"] is None  # no k/v bmm amax in the source
    write_checkpoint(tmp_path / "plain", {"architectures": ["LlamaForCausalLM"]}, {"w.weight": torch.ones(2, 2)})
    with pytest.raises(BridgeError) as refused:
        export_fp8(tmp_path / "plain", tmp_path / "plain-out")
    assert str(refused.value) == (
        f"{tmp_path / 'plain'}: no tensor ends in .weight_quantizer._amax;"
        " export a calibrated model (with quantizer state) first"
    )


def test_export_takes_the_shard_size(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_checkpoint(src, {"architectures": ["LlamaForCausalLM"]}, calibrated())
    for write in (export_fp8, export_nvfp4):
        out = write(src, tmp_path / write.__name__, max_shard_size=1024)
        assert len(list(out.glob("model-*.safetensors"))) > 1


def test_shared_input_groups_are_siblings_reading_one_input() -> None:
    modules = [
        "l.mlp.down_proj",
        "l.mlp.extra_proj",
        "l.mlp.gate_proj",
        "l.mlp.up_proj",
        "l.self_attn.k_proj",
        "l.self_attn.o_proj",
        "l.self_attn.q_proj",
        "m.mlp.gate_proj",
    ]
    assert shared_input_groups(modules) == [
        ["l.mlp.down_proj"],
        ["l.mlp.extra_proj"],
        ["l.mlp.gate_proj", "l.mlp.up_proj"],
        ["l.self_attn.k_proj", "l.self_attn.q_proj"],
        ["l.self_attn.o_proj"],
        ["m.mlp.gate_proj"],
    ]


def test_a_module_under_a_quantized_one_is_excluded_by_its_own_name() -> None:
    assert exclude_patterns({"a.b.c"}, ["a.b"]) == ["a.b.c"]
