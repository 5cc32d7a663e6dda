"""The tiny checkpoint: the released on-disk layout (names, shapes, dtypes), and its structural features."""

from __future__ import annotations

import json

import torch
from step35_testing import RELEASED, read_tensors

from bridgecore.plugins import Plugins
from bridgecore_step35.tiny import TINY_CONFIG, step35_tensor_shapes


def test_released_layout_reproduces_the_804_tensors() -> None:
    shapes = step35_tensor_shapes(RELEASED)
    assert len(shapes) == 804
    assert shapes["model.layers.0.self_attn.q_proj.weight"][0] == (8192, 4096)
    assert shapes["model.layers.1.self_attn.q_proj.weight"][0] == (12288, 4096)
    assert shapes["model.layers.1.self_attn.g_proj.weight"][0] == (96, 4096)
    assert shapes["model.layers.3.moe.gate_proj.weight"][0] == (288, 1280, 4096)
    assert shapes["model.layers.3.moe.down_proj.weight"][0] == (288, 4096, 1280)
    assert shapes["model.layers.3.moe.router_bias"] == ((288,), torch.float32)
    assert shapes["model.layers.46.eh_proj.weight"][0] == (4096, 8192)
    assert shapes["model.layers.47.transformer.shared_head.output.weight"][0] == (128896, 4096)
    assert "model.layers.45.mlp.gate_proj.weight" in shapes and "model.layers.44.moe.gate.weight" in shapes


def test_tiny_checkpoint(tiny_dir) -> None:
    tensors = read_tensors(tiny_dir)
    assert json.loads((tiny_dir / "config.json").read_text()) == TINY_CONFIG
    assert {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()} == step35_tensor_shapes(TINY_CONFIG)
    assert {n for n, t in tensors.items() if t.dtype != torch.bfloat16} == {
        "model.layers.2.moe.router_bias",
        "model.layers.3.moe.router_bias",
    }
    assert (tiny_dir / "model.safetensors.index.json").exists()


def test_tiny_keeps_the_structure() -> None:
    cfg = TINY_CONFIG
    layers, mtp = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]
    assert cfg["layer_types"][layers:] == ["full_attention", "sliding_attention"] and mtp == 2
    assert cfg["attention_other_setting"]["num_attention_heads"] != cfg["num_attention_heads"]
    assert len(set(cfg["rope_theta"])) > 1 and len(set(cfg["partial_rotary_factors"])) > 1
    assert any(cfg["swiglu_limits"]) and any(cfg["swiglu_limits_shared"])
    assert cfg["moe_layers_enum"] == "2,3" and cfg["moe_num_experts"] % 2 == 0
    assert cfg["vocab_size"] % 4 == 0 and cfg["num_attention_groups"] == 2


def test_plugin_hooks() -> None:
    plugins = Plugins(load_entry_points=False)
    import bridgecore_step35

    plugins.register(bridgecore_step35, name="step35")
    assert plugins.choose(TINY_CONFIG).name == "step35"
    assert [t.name for t in plugins.call_all("tiny_models")[0]] == ["step35"]
    assert plugins.call_all("hf_reference", hf_config=TINY_CONFIG) is not None
