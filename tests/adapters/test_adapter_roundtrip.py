"""PEFT adapters made by peft, through Megatron and back, for every family at several layouts.

What must hold: the weight delta ``scale * B @ A`` of every HF module comes back bit for bit (the
Megatron adapter of a fused linear holds the modules' different A stacked, B block-diagonal); the
Megatron adapter made from the exported PEFT directory is the first one bit for bit (Megatron ->
PEFT -> Megatron); peft loads the exported directory with every key and value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_support import TARGETS, deltas, hf_linears, make_peft, skeleton, torch_dist_tensors, write_tiny

from bridgecore import BridgeError, Layout, export_adapter, import_adapter

CASES = [
    ("llama-example", Layout()),
    ("llama-example", Layout(tp=2)),
    ("llama-example", Layout(pp=2)),
    ("qwen35-dense", Layout(tp=2)),
    ("qwen35-moe", Layout(ep=2)),
    ("qwen35-moe", Layout(tp=2, etp=2)),
    ("step35", Layout(tp=2)),
    ("step37", Layout(pp=2)),
]


def _id(case: tuple[str, Layout]) -> str:
    name, layout = case
    return f"{name}-tp{layout.tp}pp{layout.pp}ep{layout.ep}etp{layout.etp}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_peft_adapter_round_trips_exactly(case: tuple[str, Layout], tmp_path: Path) -> None:
    name, layout = case
    hf = write_tiny(name, tmp_path / "hf")
    peft_dir = make_peft(hf, tmp_path / "peft", TARGETS[name])
    first = import_adapter(peft_dir, tmp_path / "megatron", hf, layout)
    back = export_adapter(first, tmp_path / "peft-back", hf)

    want, got = deltas(peft_dir), deltas(back)
    assert sorted(got) == sorted(want)
    for module, delta in want.items():
        assert torch.equal(got[module], delta), module

    again = import_adapter(back, tmp_path / "megatron-again", hf, layout)
    saved, resaved = torch_dist_tensors(first), torch_dist_tensors(again)
    assert sorted(resaved) == sorted(saved)
    assert any(".adapter.linear_in." in k for k in saved)
    for key, value in saved.items():
        assert torch.equal(resaved[key], value), key
    record, rerecord = (json.loads((d / "adapter.json").read_text()) for d in (first, again))
    assert rerecord["modules"] == record["modules"]


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=_id)
def test_dora_adapter_round_trips_exactly_and_loads_in_peft(case: tuple[str, Layout], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
    from safetensors.torch import load_file

    name, layout = case
    hf = write_tiny(name, tmp_path / "hf")
    peft_dir = make_peft(hf, tmp_path / "peft", TARGETS[name], use_dora=True)
    first = import_adapter(peft_dir, tmp_path / "megatron", hf, layout)
    back = export_adapter(first, tmp_path / "peft-back", hf)
    assert json.loads((back / "adapter_config.json").read_text())["use_dora"] is True

    want, got = load_file(peft_dir / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    magnitudes = sorted(k for k in want if k.endswith("lora_magnitude_vector"))
    assert magnitudes and magnitudes == sorted(k for k in got if k.endswith("lora_magnitude_vector"))
    for key in magnitudes:
        assert torch.equal(got[key], want[key]), key
    for module, delta in deltas(peft_dir).items():
        assert torch.equal(deltas(back)[module], delta), module
    again = import_adapter(back, tmp_path / "megatron-again", hf, layout)
    saved, resaved = torch_dist_tensors(first), torch_dist_tensors(again)
    assert any(k.endswith(".adapter.weight_magnitude") for k in saved) and sorted(resaved) == sorted(saved)
    assert all(torch.equal(resaved[k], v) for k, v in saved.items())

    # peft's own loading (as PeftModel.from_pretrained does it), on the module tree (no causal-LM head)
    config = LoraConfig.from_pretrained(back)
    config.task_type = None
    model = get_peft_model(skeleton(hf_linears(hf, TARGETS[name])), config)
    result = set_peft_model_state_dict(model, load_peft_weights(back))
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    loaded = get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(got) and all(torch.equal(loaded[k], got[k]) for k in got)


def test_excluded_linears_are_left_out_of_the_export(tmp_path: Path) -> None:
    """Qwen3.5's MTP head carries adapters like any layer (the round trips above include it); a
    consumer without an MTP head asks for the rest (``--exclude 'mtp.*'``)."""
    hf = write_tiny("qwen35-dense", tmp_path / "hf")
    peft_dir = make_peft(hf, tmp_path / "peft", TARGETS["qwen35-dense"])
    first = import_adapter(peft_dir, tmp_path / "megatron", hf)
    want = deltas(peft_dir)
    assert any(m.startswith("mtp.") for m in want)
    back = export_adapter(first, tmp_path / "peft-back", hf, exclude=["mtp.*"])
    got = deltas(back)
    assert sorted(got) == sorted(m for m in want if not m.startswith("mtp."))
    assert all(torch.equal(got[m], want[m]) for m in got)
    with pytest.raises(BridgeError, match="leaves no adapter to export"):
        export_adapter(first, tmp_path / "none", hf, exclude=["*"])
