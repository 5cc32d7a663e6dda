"""Megatron LoRA checkpoints saved by megatron-core from a model with adapters, exported to PEFT.

The independent reference: transformers' model with the exported adapter loaded by peft gives the
logits Megatron gave with its adapters (fp32); and the Megatron adapter made back from the PEFT
directory is the saved one bit for bit (Megatron -> PEFT -> Megatron).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adapter_support import Native, torch_dist_tensors

from bridgecore import Layout, export_adapter, import_adapter

#: as `bridgecore verify`: max abs diff over the largest reference logit (measured: 1e-6 to 3e-5)
RTOL = 1e-4


def reference(name: str, hf: Path) -> torch.nn.Module:
    if name.startswith("qwen35"):
        from bridgecore_qwen35.reference import reference_model

        return reference_model(hf, torch.float32)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()


@pytest.mark.parametrize(("name", "tp", "ep"), [("llama-example", 2, 1), ("qwen35-dense", 2, 1), ("qwen35-moe", 1, 2)])
def test_megatron_adapter_logits_match_peft(name: str, tp: int, ep: int, native: Native, tmp_path: Path) -> None:
    from adapter_worker import ALPHA, tokens
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    hf, saved_dir = native(name, tp, ep, "dense")
    peft_dir = export_adapter(saved_dir, tmp_path / "peft", hf, alpha=ALPHA)

    base = reference(name, hf)
    ids = tokens(base.config.vocab_size)
    with torch.no_grad():
        plain = base(input_ids=ids).logits.float()
    model = PeftModel.from_pretrained(base, peft_dir).eval()
    saved = load_file(peft_dir / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits.float()
    megatron = torch.load(saved_dir / "logits.pt")
    bound = RTOL * adapted.abs().max().item()
    assert (megatron - adapted).abs().max().item() <= bound
    # the check can fail: without the adapter the logits are far from Megatron's
    assert (megatron - plain).abs().max().item() > 100 * bound

    again = import_adapter(peft_dir, tmp_path / "megatron-again", hf, Layout(tp=tp, ep=ep))
    saved_native, resaved = torch_dist_tensors(saved_dir), torch_dist_tensors(again)
    assert sorted(resaved) == sorted(saved_native)
    for key, value in saved_native.items():
        assert torch.equal(resaved[key], value), key


def test_megatron_expert_adapters_round_trip_per_expert(native: Native, tmp_path: Path) -> None:
    """Adapters on the routed experts (stored per expert in HF) export under each expert's names and
    come back bit for bit; each expert's delta is the Megatron expert's."""
    from adapter_support import deltas

    from bridgecore.megatron.adapters import LINEAR_IN, LINEAR_OUT

    hf, saved_dir = native("qwen35-moe", 1, 2, "all")
    peft_dir = export_adapter(saved_dir, tmp_path / "peft", hf, alpha=8.0)
    got = deltas(peft_dir)
    saved = torch_dist_tensors(saved_dir)
    # an independent reading of the saved expert adapter: expert 3 of layer 1, fc2 (one HF module)
    a = saved[f"decoder.layers.1.mlp.experts.experts.linear_fc2.{LINEAR_IN}"][3].double()
    b = saved[f"decoder.layers.1.mlp.experts.experts.linear_fc2.{LINEAR_OUT}"][3].double()
    want = sum(torch.outer(b[:, j], a[j]) for j in range(a.shape[0])) * (8.0 / a.shape[0])
    assert torch.equal(got["model.layers.1.mlp.experts.3.down_proj"], want)
    again = import_adapter(peft_dir, tmp_path / "megatron-again", hf, Layout(ep=2))
    resaved = torch_dist_tensors(again)
    assert sorted(resaved) == sorted(saved)
    for key, value in saved.items():
        assert torch.equal(resaved[key], value), key


def test_merge_matches_peft_merge_and_unload(native: Native, tmp_path: Path) -> None:
    """``--merge`` writes the base checkpoint with the adapter merged: peft's ``merge_and_unload`` on the
    same adapter (fp32), rounded to the checkpoint's bf16, every other tensor as the base holds it."""
    from adapter_worker import ALPHA
    from peft import PeftModel
    from safetensors.torch import load_file

    hf, saved_dir = native("llama-example", 1, 1, "dense")
    peft_dir = export_adapter(saved_dir, tmp_path / "peft", hf, alpha=ALPHA)
    merged_dir = export_adapter(saved_dir, tmp_path / "merged", hf, alpha=ALPHA, merge=True)

    base = {k: v for f in sorted(hf.glob("*.safetensors")) for k, v in load_file(f).items()}
    merged = {k: v for f in sorted(merged_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert sorted(merged) == sorted(base)
    assert sorted(p.name for p in merged_dir.iterdir()) == sorted(p.name for p in hf.iterdir())
    want = PeftModel.from_pretrained(reference("llama-example", hf), peft_dir).merge_and_unload().state_dict()
    changed = 0
    for name, value in merged.items():
        if name.endswith("_proj.weight"):
            assert not torch.equal(value, base[name]), name
            changed += 1
            # both sum in fp32 (in other orders) and round to bf16: equal but where the fp32 sums fall
            # on either side of a rounding boundary, there one bf16 step apart
            rounded = want[name].to(value.dtype)
            assert (value.float() - rounded.float()).abs().le(rounded.float().abs() * 2**-7).all(), name
            assert (value == rounded).float().mean().item() > 0.99, name
        else:
            assert torch.equal(value, base[name]), name
    assert changed == 14


def test_megatron_dora_adapter_exports_and_merges_as_peft(native: Native, tmp_path: Path) -> None:
    """A DoRA adapter saved by megatron-core at TP2 (magnitudes split with the rows of linear_qkv and
    linear_fc1, whole for linear_proj and linear_fc2): peft loads its export into transformers' model,
    and ``--merge`` gives peft's ``merge_and_unload`` rounded to bf16; back in Megatron bit for bit."""
    from adapter_worker import ALPHA
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    hf, saved_dir = native("llama-example", 2, 1, "dense+dora")
    peft_dir = export_adapter(saved_dir, tmp_path / "peft", hf, alpha=ALPHA)
    merged_dir = export_adapter(saved_dir, tmp_path / "merged", hf, alpha=ALPHA, merge=True)
    model = PeftModel.from_pretrained(reference("llama-example", hf), peft_dir)
    saved = load_file(peft_dir / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert sum(k.endswith("lora_magnitude_vector") for k in saved) == 14
    assert sorted(loaded) == sorted(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    want = model.merge_and_unload().state_dict()
    merged = {k: v for f in sorted(merged_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    for name, value in merged.items():
        if name.endswith("_proj.weight"):
            rounded = want[name].to(value.dtype)
            assert (value.float() - rounded.float()).abs().le(rounded.float().abs() * 2**-7).all(), name
            assert (value == rounded).float().mean().item() > 0.99, name
    again = import_adapter(peft_dir, tmp_path / "megatron-again", hf, Layout(tp=2))
    before, after = torch_dist_tensors(saved_dir), torch_dist_tensors(again)
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], v) for k, v in before.items())
