"""A tiny Step-3.7 checkpoint in the released on-disk layout, and its re-saved-layout variant.

The text decoder is the Step-3.5 tiny one (full/sliding layers with 4/6 heads, dense then MoE, two
MTP layers, clamps) without the keys Step-3.7's text config lacks (`zero_centered`,
`tie_word_embeddings`, `use_qk_norm`). The tower keeps PE-G/14's structure at width 32: 2 blocks of
2 heads (head dim 16, so 2D rope has 4 pairs per axis), patch 14 on a 112-pixel image (8×8 grid),
downsampled 8×8 -> 4×4 -> 2×2, i.e. 4 image tokens of width 128 projected to the hidden size 64.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from bridgecore.plugin import TinyModel, random_tensor, write_checkpoint
from bridgecore_step35.tiny import TINY_CONFIG as STEP35_TINY_CONFIG
from bridgecore_step35.tiny import step35_tensor_shapes
from bridgecore_step37.architectures import ARCHITECTURE
from bridgecore_step37.provider import vision_config

#: Keys the released Step-3.7 text_config does not carry.
ABSENT_TEXT_KEYS = ("zero_centered", "tie_word_embeddings", "use_qk_norm")

TINY_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "step3p5",
    **{k: v for k, v in STEP35_TINY_CONFIG.items() if k not in ("architectures", "model_type", *ABSENT_TEXT_KEYS)},
}

TINY_VISION_CONFIG: dict[str, Any] = {
    "model_type": "perception_encoder",
    "width": 32,
    "layers": 2,
    "heads": 2,
    "patch_size": 14,
    "image_size": 112,
    "mlp_ratio": 2.0,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "use_cls_token": False,
    "use_ln_pre": True,
    "use_ln_post": False,
    "use_abs_posemb": True,
    "use_rope2d": True,
    "ls_init_value": 0.1,
    "num_channels": 3,
}

TINY_CONFIG: dict[str, Any] = {
    "architectures": [ARCHITECTURE],
    "model_type": "step3p7",
    "image_token_id": 127,
    "understand_projector_stride": 2,
    "projector_bias": False,
    "hidden_size": TINY_TEXT_CONFIG["hidden_size"],
    "max_position_embeddings": TINY_TEXT_CONFIG["max_position_embeddings"],
    "torch_dtype": "bfloat16",
    "text_config": TINY_TEXT_CONFIG,
    "vision_config": TINY_VISION_CONFIG,
}

#: StepFun's own key mapping from the released layout to the re-saved one.
_RESAVED = (
    (re.compile(r"^vision_model\."), "model.vision_model."),
    (re.compile(r"^vit_large_projector\."), "model.vit_large_projector."),
    (re.compile(r"^model\.(?!language_model\.|vision_model\.|vit_large_projector\.)"), "model.language_model."),
)


def resaved_name(name: str) -> str:
    """The re-saved (`model.language_model.`) name of a released-layout tensor name."""
    for pattern, replacement in _RESAVED:
        name = pattern.sub(replacement, name)
    return name


def step37_tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor of a released-layout Step-3.7 checkpoint of config `cfg`."""
    vision, bf16 = vision_config(cfg["vision_config"]), torch.bfloat16
    w, inter, hidden = vision.width, vision.intermediate_size, cfg["text_config"]["hidden_size"]
    out = step35_tensor_shapes(cfg["text_config"])
    out |= {
        "vision_model.conv1.weight": ((w, vision.num_channels, vision.patch_size, vision.patch_size), bf16),
        "vision_model.positional_embedding": ((vision.grid**2, w), bf16),
        "vision_model.ln_pre.weight": ((w,), bf16),
        "vision_model.ln_pre.bias": ((w,), bf16),
    }
    for i in range(vision.layers):
        p = f"vision_model.transformer.resblocks.{i}."
        out |= {
            f"{p}ln_1.weight": ((w,), bf16),
            f"{p}ln_1.bias": ((w,), bf16),
            f"{p}attn.in_proj_weight": ((3 * w, w), bf16),
            f"{p}attn.in_proj_bias": ((3 * w,), bf16),
            f"{p}attn.out_proj.weight": ((w, w), bf16),
            f"{p}attn.out_proj.bias": ((w,), bf16),
            f"{p}ls_1.gamma": ((w,), bf16),
            f"{p}ln_2.weight": ((w,), bf16),
            f"{p}ln_2.bias": ((w,), bf16),
            f"{p}mlp.c_fc.weight": ((inter, w), bf16),
            f"{p}mlp.c_fc.bias": ((inter,), bf16),
            f"{p}mlp.c_proj.weight": ((w, inter), bf16),
            f"{p}mlp.c_proj.bias": ((w,), bf16),
            f"{p}ls_2.gamma": ((w,), bf16),
        }
    out |= {
        "vision_model.vit_downsampler1.weight": ((2 * w, w, 3, 3), bf16),
        "vision_model.vit_downsampler1.bias": ((2 * w,), bf16),
        "vision_model.vit_downsampler2.weight": ((4 * w, 2 * w, 3, 3), bf16),
        "vision_model.vit_downsampler2.bias": ((4 * w,), bf16),
        "vit_large_projector.weight": ((hidden, 4 * w), bf16),
    }
    if cfg.get("projector_bias"):
        out["vit_large_projector.bias"] = ((hidden,), bf16)
    return out


def _random(name: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Values that keep activations near unit size; text tensors as the Step-3.5 tiny model draws them."""
    if not name.startswith(("vision_model.", "vit_large_projector.")):
        std = 0.1 if len(shape) == 1 else shape[-1] ** -0.5
        return random_tensor(shape, dtype, generator, std=std)
    if name.endswith(("ln_pre.weight", "ln_1.weight", "ln_2.weight")):
        return (1 + random_tensor(shape, torch.float32, generator, std=0.1)).to(dtype)
    if name.endswith("gamma"):
        return (0.1 + random_tensor(shape, torch.float32, generator, std=0.05)).to(dtype)
    if len(shape) == 1:
        return random_tensor(shape, dtype, generator, std=0.05)
    if name.endswith("positional_embedding"):
        return random_tensor(shape, dtype, generator, std=0.5)
    fan_in = torch.Size(shape[1:]).numel()
    return random_tensor(shape, dtype, generator, std=fan_in**-0.5)


def tiny_config(projector_bias: bool = False) -> dict[str, Any]:
    return {**TINY_CONFIG, "projector_bias": projector_bias}


def write_tiny(out: Path, seed: int = 0, resaved: bool = False, projector_bias: bool = False) -> None:
    """Write the tiny checkpoint into `out`: released layout, or with `resaved` the re-saved one."""
    cfg = tiny_config(projector_bias)
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        resaved_name(name) if resaved else name: _random(name, shape, dtype, generator)
        for name, (shape, dtype) in step37_tensor_shapes(cfg).items()
    }
    write_checkpoint(out, cfg, tensors, shards=2)


TINY = TinyModel(
    "step37",
    "Step-3.7 in miniature: the Step-3.5 tiny decoder plus a 2-block PE tower (2D rope, LayerScale, 2 downsamplers)",
    write_tiny,
)
