"""Megatron Step-3.7 vs transformers' `Step3p7ForConditionalGeneration`, fp32, on the tiny checkpoints.

Measured max abs diffs (values of order 1-5): text logits 3.7e-6, image features 9.8e-7, logits with
images in place of image tokens 4.5e-6, features of a non-native 42-pixel image (resized positional
embedding) 3.4e-7. Tolerances: 5e-5 on logits, 1e-5 on features.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import bridgecore_step37.vision as vision
from bridgecore import AutoBridge
from bridgecore.errors import BridgeError
from bridgecore.megatron.compat import cpu_compat
from bridgecore_step37.reference import step37_image_features, step37_reference
from bridgecore_step37.tiny import TINY_CONFIG

LOGITS_TOLERANCE, FEATURES_TOLERANCE = 5e-5, 1e-5
IMAGE_TOKEN = TINY_CONFIG["image_token_id"]
TOKENS_PER_IMAGE = 4  # 112 px / patch 14 = 8x8 -> 4x4 -> 2x2


@pytest.fixture(scope="module", params=["released", "resaved"])
def converted(request: pytest.FixtureRequest) -> Iterator[tuple[Path, Any, torch.nn.Module]]:
    src: Path = request.getfixturevalue(f"{request.param}_dir")
    bridge = AutoBridge.from_hf_pretrained(src, params_dtype=torch.float32)
    yield src, bridge.config, bridge.to_megatron_model()[0]


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, IMAGE_TOKEN, (2, 12), generator=generator)
    tokens[0, 2 : 2 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    tokens[1, 6 : 6 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    return tokens, torch.randn(2, 3, 112, 112, generator=generator)


def test_text_logits(converted) -> None:
    src, config, model = converted
    tokens, _ = _inputs(1)
    tokens[tokens == IMAGE_TOKEN] = 5
    with cpu_compat(), torch.no_grad():
        ours = config.forward_logits(model, tokens)
    assert (ours - step37_reference(src, tokens)).abs().max().item() < LOGITS_TOLERANCE


def test_image_features(converted) -> None:
    src, _, model = converted
    _, pixels = _inputs(2)
    with torch.no_grad():
        ours = model.image_features(pixels)
    assert ours.shape == (2, TOKENS_PER_IMAGE, TINY_CONFIG["hidden_size"])
    assert (ours - step37_image_features(src, pixels)).abs().max().item() < FEATURES_TOLERANCE


def test_logits_with_images(converted) -> None:
    src, config, model = converted
    tokens, pixels = _inputs(3)
    with cpu_compat(), torch.no_grad():
        ours = config.forward_logits(model, tokens, pixels)
        text_only = config.forward_logits(model, tokens)
    assert (ours - step37_reference(src, tokens, pixels)).abs().max().item() < LOGITS_TOLERANCE
    assert (ours - text_only).abs().max().item() > 1e-2  # the images did change the logits


def test_non_native_image_size(converted) -> None:
    src, _, model = converted
    pixels = torch.randn(1, 3, 42, 42, generator=torch.Generator().manual_seed(4))  # 3x3 grid -> 1 token
    with torch.no_grad():
        ours = model.image_features(pixels)
    assert ours.shape[1] == 1
    assert (ours - step37_image_features(src, pixels)).abs().max().item() < FEATURES_TOLERANCE


def test_parity_sees_the_rope_axis_order(converted, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rotating the H pairs by the W positions and back must break parity: the check is not blind."""
    src, _, model = converted
    _, pixels = _inputs(5)
    exact = vision.rope_2d_angles
    monkeypatch.setattr(
        vision, "rope_2d_angles", lambda *args: exact(*args).unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    )
    with torch.no_grad():
        swapped = model.image_features(pixels)
    assert (swapped - step37_image_features(src, pixels)).abs().max().item() > 1e-3


def test_image_token_count_must_match(converted) -> None:
    _, config, model = converted
    tokens, pixels = _inputs(6)
    tokens[0, 0] = IMAGE_TOKEN
    with cpu_compat(), torch.no_grad(), pytest.raises(BridgeError, match="image tokens"):
        config.forward_logits(model, tokens, pixels)
