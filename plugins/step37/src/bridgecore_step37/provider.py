"""Step-3.7 config.json -> Megatron-Core config: Step-3.5 text decoder + PE-G/14 vision tower.

The text decoder comes from the nested `text_config` through the Step-3.5 plugin's translation,
which already defaults the keys Step-3.7's text config lacks (`zero_centered`, `use_qk_norm`,
`tie_word_embeddings`). The vision tower and projector are described by `VisionConfig` and the
top-level keys `image_token_id`, `projector_bias` and `understand_projector_stride`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bridgecore.plugin import BridgeError
from bridgecore_step35.provider import Step35Config, step35_model_config
from bridgecore_step37.vision import DEFAULT_IMAGE_TOKEN_ID, Step37Config, VisionConfig

#: The released value, used when config.json omits the key.
DOWNSAMPLE_STRIDE = 2
#: Vision features the released tower does not use, with the value the tower here requires.
_VISION_FIXED = {
    "use_cls_token": False,
    "use_ln_pre": True,
    "use_ln_post": False,
    "use_abs_posemb": True,
    "use_rope2d": True,
    "hidden_act": "quick_gelu",
    "rope_theta_rescale_factor": 1.0,
}


def _size(cfg: dict[str, Any], *keys: str) -> int:
    """The first of `keys` present in `vision_config` (PE name first, then transformers' name)."""
    for key in keys:
        if cfg.get(key) is not None:
            return int(cfg[key])
    raise BridgeError(f"config.json vision_config lacks {' (or '.join(keys)}{')' * (len(keys) - 1)}")


def vision_config(cfg: dict[str, Any]) -> VisionConfig:
    """`VisionConfig` from a `vision_config` dict (PE key names, or transformers' re-saved ones)."""
    for key, required in _VISION_FIXED.items():
        if key in cfg and cfg[key] != required:
            raise BridgeError(f"config.json vision_config.{key} is {cfg[key]!r}; only {required!r} is supported")
    width, heads = _size(cfg, "width", "hidden_size"), _size(cfg, "heads", "num_attention_heads")
    layers = _size(cfg, "layers", "num_hidden_layers")
    patch, image = _size(cfg, "patch_size"), _size(cfg, "image_size")
    # transformers sizes the MLP as int(width * mlp_ratio); the released ratio is 8960/1536.
    intermediate = int(cfg.get("intermediate_size") or width * float(cfg.get("mlp_ratio", 4.0)))
    head_dim = width // heads
    if width % heads or head_dim % 4:
        raise BridgeError(
            f"config.json vision_config: width {width} over {heads} heads must give a head dim divisible by 4"
            " (2D rope rotates pairs for both axes)"
        )
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise BridgeError(f"config.json vision_config.rope_parameters.rope_type is {rope['rope_type']!r}; only 'axial'")
    unknown = sorted(set(rope) - {"rope_type", "rope_theta"})
    if unknown:
        raise BridgeError(f"config.json vision_config.rope_parameters has {unknown}, which the 2D rope does not use")
    return VisionConfig(
        width=width,
        layers=layers,
        heads=heads,
        patch_size=patch,
        image_size=image,
        intermediate_size=intermediate,
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        num_channels=int(cfg.get("num_channels", 3)),
    )


def step37_model_config(hf_config: dict[str, Any]) -> Step37Config:
    """Translate a Step-3.7 config.json into a `Step37Config`."""
    text_cfg, vision_cfg = hf_config.get("text_config"), hf_config.get("vision_config")
    if not isinstance(text_cfg, dict) or not isinstance(vision_cfg, dict):
        raise BridgeError("config.json of Step-3.7 needs both a text_config and a vision_config object")
    stride = int(hf_config.get("understand_projector_stride", DOWNSAMPLE_STRIDE))
    if stride != DOWNSAMPLE_STRIDE:
        raise BridgeError(
            f"config.json understand_projector_stride is {stride}; only {DOWNSAMPLE_STRIDE} (the released"
            " two stride-2 downsamplers) is supported"
        )
    text = step35_model_config(text_cfg)
    fields = {f.name: getattr(text, f.name) for f in dataclasses.fields(Step35Config) if f.init}
    return Step37Config(
        **fields,
        vision=vision_config(vision_cfg),
        image_token_id=int(hf_config.get("image_token_id", DEFAULT_IMAGE_TOKEN_ID)),
        projector_bias=bool(hf_config.get("projector_bias", False)),
    )
