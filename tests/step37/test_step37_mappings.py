"""The mapping table at full size, by name: both on-disk layouts, every HF tensor of the tower."""

from __future__ import annotations

import json

import pytest
import torch
from step37_testing import RELEASED

from bridgecore.hf.reader import CheckpointReader
from bridgecore.mapping import Replicated
from bridgecore_step37.mappings import step37_mappings
from bridgecore_step37.provider import step37_model_config
from bridgecore_step37.tiny import TINY_CONFIG, resaved_name, step37_tensor_shapes

VISION_BLOCKS = 47


def _released_names() -> set[str]:
    return set(step37_tensor_shapes(RELEASED))


def test_released_layout_shapes() -> None:
    shapes = step37_tensor_shapes(RELEASED)
    assert len(shapes) == 804 + 8 + VISION_BLOCKS * 14 + 1
    assert shapes["vision_model.conv1.weight"][0] == (1536, 3, 14, 14)
    assert shapes["vision_model.positional_embedding"][0] == (2704, 1536)
    assert shapes["vision_model.transformer.resblocks.46.attn.in_proj_weight"][0] == (4608, 1536)
    assert shapes["vision_model.transformer.resblocks.0.mlp.c_fc.weight"][0] == (8960, 1536)
    assert shapes["vision_model.vit_downsampler1.weight"][0] == (3072, 1536, 3, 3)
    assert shapes["vision_model.vit_downsampler2.weight"][0] == (6144, 3072, 3, 3)
    assert shapes["vit_large_projector.weight"][0] == (4096, 6144)
    assert "vit_large_projector.bias" not in shapes and "lm_head.weight" in shapes


def test_resaved_names() -> None:
    assert resaved_name("model.layers.45.enorm.weight") == "model.language_model.layers.45.enorm.weight"
    assert resaved_name("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    assert resaved_name("vision_model.conv1.weight") == "model.vision_model.conv1.weight"
    assert resaved_name("vit_large_projector.weight") == "model.vit_large_projector.weight"
    assert resaved_name("lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize("resaved", [False, True])
def test_tower_and_projector_cover_every_tensor(resaved: bool) -> None:
    names = {resaved_name(n) if resaved else n for n in _released_names()}
    config = step37_model_config(RELEASED)
    mappings = step37_mappings(config, frozenset(names))
    vision = [m for m in mappings if not m.megatron.text.startswith("language_model.")]
    assert all(isinstance(m, Replicated) for m in vision)
    produced = {
        name
        for m in vision
        for block in (range(VISION_BLOCKS) if "block" in m.megatron.fields else [0])
        for name in m.hf_names({"block": block})
    }
    expected = {n for n in names if "vision_model." in n or "vit_large_projector." in n}
    assert produced == expected
    projector = [m for m in vision if m.megatron.text.startswith("image_insert_embedding.align_projector.")]
    assert [m.megatron.text for m in projector] == ["image_insert_embedding.align_projector.weight"]


@pytest.mark.parametrize("resaved", [False, True])
def test_language_model_prefixes(resaved: bool) -> None:
    names = {resaved_name(n) if resaved else n for n in _released_names()}
    mappings = step37_mappings(step37_model_config(RELEASED), frozenset(names))
    text = [m for m in mappings if m.megatron.text.startswith("language_model.")]
    hf_prefix = "model.language_model." if resaved else "model."
    hf = {p.text for m in text for p in m.hf}
    assert "lm_head.weight" in hf
    assert all(h.startswith(hf_prefix) for h in hf - {"lm_head.weight"})
    # the released layout's names are not under model.language_model. (which also starts with model.)
    assert all(h.startswith("model.language_model.") is resaved for h in hf - {"lm_head.weight"})
    assert f"{hf_prefix}embed_tokens.weight" in hf
    assert any(m.megatron.text == "language_model.output_layer.weight" for m in text)  # untied


def test_projector_bias_is_mapped_when_configured() -> None:
    config = step37_model_config({**RELEASED, "projector_bias": True})
    hf = {p.text for m in step37_mappings(config, frozenset()) for p in m.hf}
    assert {"vit_large_projector.weight", "vit_large_projector.bias"} <= hf


def _on_disk(path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with CheckpointReader(path) as reader:
        return {n: (tuple(reader.shape(n)), reader.dtype(n)) for n in reader.keys()}


def test_tiny_checkpoints(released_dir, resaved_dir) -> None:
    assert json.loads((released_dir / "config.json").read_text()) == TINY_CONFIG
    assert _on_disk(released_dir) == step37_tensor_shapes(TINY_CONFIG)
    with_bias = step37_tensor_shapes({**TINY_CONFIG, "projector_bias": True})
    assert _on_disk(resaved_dir) == {resaved_name(n): entry for n, entry in with_bias.items()}
