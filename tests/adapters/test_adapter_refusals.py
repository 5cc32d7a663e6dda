"""Bad adapters and bases: one line naming the key, module or tensor, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_support import TARGETS, Native, make_peft, write_tiny
from safetensors.torch import load_file, save_file

from bridgecore import BridgeError, Layout, export_adapter, import_adapter
from bridgecore.testing import run_bridgecore


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny("llama-example", tmp_path_factory.mktemp("llama") / "hf")


@pytest.fixture(scope="module")
def peft(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft(llama, tmp_path_factory.mktemp("peft") / "adapter", TARGETS["llama-example"])


def _copy(peft: Path, out: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    out.mkdir()
    (out / "adapter_config.json").write_text(
        json.dumps({**json.loads((peft / "adapter_config.json").read_text()), **(config or {})})
    )
    save_file(tensors or load_file(peft / "adapter_model.safetensors"), out / "adapter_model.safetensors")
    return out


def _refused(call, out: Path, *words: str) -> str:  # noqa: ANN001
    with pytest.raises(BridgeError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return message


@pytest.mark.parametrize(
    ("key", "value"),
    [("use_rslora", True), ("fan_in_fan_out", True), ("lora_bias", True), ("bias", "all")],
)
def test_a_numeric_option_not_understood_is_refused(key: str, value: object, peft: Path, llama: Path, tmp_path: Path):
    bad = _copy(peft, tmp_path / "bad", {key: value})
    _refused(lambda: import_adapter(bad, tmp_path / "out", llama), tmp_path / "out", "adapter_config.json", key)


def test_an_unknown_config_key_that_is_set_is_refused(peft: Path, llama: Path, tmp_path: Path) -> None:
    bad = _copy(peft, tmp_path / "bad", {"lora_magic_scaling": 2.0})
    _refused(lambda: import_adapter(bad, tmp_path / "out", llama), tmp_path / "out", "lora_magic_scaling")


@pytest.mark.parametrize("key", ["r", "lora_alpha"])
def test_rank_or_alpha_missing_is_refused(key: str, peft: Path, llama: Path, tmp_path: Path) -> None:
    bad = _copy(peft, tmp_path / "bad")
    config = json.loads((bad / "adapter_config.json").read_text())
    del config[key]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    _refused(lambda: import_adapter(bad, tmp_path / "out", llama), tmp_path / "out", key)


def test_an_adapter_for_another_base_is_refused_by_shape(peft: Path, llama: Path, tmp_path: Path) -> None:
    tensors = load_file(peft / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] * 2)
    bad = _copy(peft, tmp_path / "bad", tensors=tensors)
    _refused(
        lambda: import_adapter(bad, tmp_path / "out", llama),
        tmp_path / "out",
        "model.layers.1.self_attn.v_proj",
        "another base",
    )


def test_an_unknown_target_module_is_refused(llama: Path, tmp_path: Path) -> None:
    other = write_tiny("qwen35-dense", tmp_path / "qwen")
    bad = make_peft(other, tmp_path / "bad", ["in_proj_z"])
    _refused(lambda: import_adapter(bad, tmp_path / "out", llama), tmp_path / "out", "linear_attn.in_proj_z")


def test_a_router_adapter_is_refused(tmp_path: Path) -> None:
    moe = write_tiny("qwen35-moe", tmp_path / "hf")
    bad = make_peft(moe, tmp_path / "bad", ["shared_expert_gate"])
    _refused(lambda: import_adapter(bad, tmp_path / "out", moe), tmp_path / "out", "shared_expert_gate")


def test_different_scales_in_one_fused_linear_are_refused(llama: Path, tmp_path: Path) -> None:
    bad = make_peft(llama, tmp_path / "bad", TARGETS["llama-example"], alpha_pattern={"k_proj": 16})
    _refused(lambda: import_adapter(bad, tmp_path / "out", llama), tmp_path / "out", "linear_qkv", "scale")


def test_a_rank_that_does_not_split_over_tp_is_refused(llama: Path, tmp_path: Path) -> None:
    # a column-parallel linear splits its adapter's rank over TP (a row-parallel one takes any rank)
    bad = make_peft(llama, tmp_path / "bad", ["q_proj", "k_proj", "v_proj"], r=3)
    _refused(lambda: import_adapter(bad, tmp_path / "out", llama, Layout(tp=2)), tmp_path / "out", "TP=2")


def test_a_pickle_adapter_is_never_loaded(peft: Path, llama: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((peft / "adapter_config.json").read_text())
    (bad / "adapter_model.bin").write_bytes(b"not loaded")
    _refused(lambda: import_adapter(bad, tmp_path / "out", llama), tmp_path / "out", "pickle")


def test_export_without_alpha_names_it(native: Native, tmp_path: Path) -> None:
    hf, saved = native("llama-example", 1, 1, "dense")
    _refused(lambda: export_adapter(saved, tmp_path / "out", hf), tmp_path / "out", "alpha", "--alpha")
    done = run_bridgecore("export-adapter", saved, tmp_path / "out", "--base", hf)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--alpha" in done.stderr, done.stderr


def test_adapters_on_packed_experts_are_refused(native: Native, tmp_path: Path) -> None:
    hf, saved = native("step35", 1, 1, "experts")
    _refused(
        lambda: export_adapter(saved, tmp_path / "out", hf, alpha=8.0),
        tmp_path / "out",
        "local_experts",
        "carries a LoRA adapter",
    )


def test_a_checkpoint_without_adapters_is_refused(llama: Path, tmp_path: Path) -> None:
    done = run_bridgecore("import", llama, tmp_path / "megatron", "--offline")
    assert done.returncode == 0, done.stderr
    _refused(
        lambda: export_adapter(tmp_path / "megatron", tmp_path / "out", llama, alpha=8.0),
        tmp_path / "out",
        "no LoRA adapter weights",
    )


def test_a_head_gate_adapter_that_hf_cannot_hold_is_refused(native: Native, tmp_path: Path) -> None:
    """Step's head-wise gate is one HF row per head, repeated over the head's channels in linear_qkv:
    an adapter trained in Megatron gives those channels different rows, which no HF adapter holds."""
    hf, saved = native("step35", 1, 1, "dense")
    _refused(
        lambda: export_adapter(saved, tmp_path / "out", hf, alpha=8.0),
        tmp_path / "out",
        "linear_qkv.adapter.linear_out.weight",
        "g_proj",
        "no longer equal",
    )


def test_a_dora_adapter_on_part_of_a_fused_linear_is_refused(llama: Path, tmp_path: Path) -> None:
    """The magnitude of linear_qkv's k rows would be the base k_proj's row norms: not in the adapter."""
    bad = make_peft(llama, tmp_path / "bad", ["q_proj", "v_proj"], use_dora=True)
    _refused(lambda: import_adapter(bad, tmp_path / "out", llama), tmp_path / "out", "linear_qkv", "k_proj", "DoRA")


def test_magnitudes_without_use_dora_are_refused(llama: Path, tmp_path: Path) -> None:
    dora = make_peft(llama, tmp_path / "dora", ["o_proj"], use_dora=True)
    bad = _copy(dora, tmp_path / "bad", {"use_dora": False})
    _refused(
        lambda: import_adapter(bad, tmp_path / "out", llama), tmp_path / "out", "lora_magnitude_vector", "use_dora"
    )
