"""The reference forward: transformers' own `Step3p7ForConditionalGeneration`, from the plain config.

transformers renames the on-disk tensors when it loads them; here the renames are explicit:
- text decoder: the Step-3.5 plugin's renames, under `model.language_model.`;
- tower: `conv1` -> `embeddings.patch_embedding`, `positional_embedding` ->
  `embeddings.position_embedding.weight`, `ln_pre` -> `pre_layernorm`, `transformer.resblocks` ->
  `layers`, `ln_1/ln_2` -> `layernorm_before/after`, `ls_1/ls_2.gamma` -> `lambda_1/2`, `attn` ->
  `self_attn`, `mlp.c_fc/c_proj` -> `mlp.fc1/fc2`, `vit_downsamplerN` -> `downsamplerN`; the fused
  `in_proj_*` is cut into q, k, v, and q, k rows are permuted per head from PE's pairwise rope
  layout (pair p at rows 2p, 2p+1) to transformers' half-split one (rows p, p + head_dim/2);
- projector: `vit_large_projector` -> `model.multi_modal_projector`.
Everything runs in fp32 with eager attention.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bridgecore.plugin import BridgeError, CheckpointReader
from bridgecore_step35.reference import reference_state_dict
from bridgecore_step37.provider import vision_config

_TO_RELEASED = (
    ("model.language_model.", "model."),
    ("model.vision_model.", "vision_model."),
    ("model.vit_large_projector.", "vit_large_projector."),
)
_TOWER_RENAMES = (
    ("conv1.weight", "embeddings.patch_embedding.weight"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_pre.", "pre_layernorm."),
    ("transformer.resblocks.", "layers."),
    ("vit_downsampler1.", "downsampler1."),
    ("vit_downsampler2.", "downsampler2."),
    (".ls_1.gamma", ".lambda_1"),
    (".ls_2.gamma", ".lambda_2"),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
    (".attn.", ".self_attn."),
    (".ln_1.", ".layernorm_before."),
    (".ln_2.", ".layernorm_after."),
)


def released_names(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under its released-layout name, whichever layout it is in."""
    out = {}
    with CheckpointReader(hf_dir) as reader:
        for name in reader.keys():
            tensor = reader.read(name, ())
            for resaved, released in _TO_RELEASED:
                if name.startswith(resaved):
                    name = released + name.removeprefix(resaved)
                    break
            out[name] = tensor
    return out


def _pairwise_to_half_split(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head, rows (2p, 2p+1) -> (p, p + head_dim/2): PE's rope layout to transformers'."""
    per_head = rows.unflatten(0, (heads, -1, 2))
    return per_head.transpose(1, 2).flatten(0, 2)


def vision_state_dict(tensors: dict[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    """Released tower and projector names -> `Step3p7Model` names (prefixed `model.`), in fp32."""
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.float()
        if name.startswith("vit_large_projector."):
            out[f"model.multi_modal_projector.{name.removeprefix('vit_large_projector.')}"] = tensor
            continue
        if not name.startswith("vision_model."):
            continue
        name = name.removeprefix("vision_model.")
        for old, new in _TOWER_RENAMES:
            name = name.replace(old, new)
        if name.endswith((".in_proj_weight", ".in_proj_bias")):
            base, kind = name.rsplit(".in_proj_", 1)
            q, k, v = tensor.chunk(3, dim=0)
            q, k = _pairwise_to_half_split(q, heads), _pairwise_to_half_split(k, heads)
            for part, value in zip("qkv", (q, k, v), strict=True):
                out[f"model.vision_model.{base}.{part}_proj.{kind}"] = value
        else:
            out[f"model.vision_model.{name}"] = tensor
    return out


def reference_config(hf_config: dict[str, Any]) -> Any:
    """`Step3p7Config` from the plain config.json dict (no remote code), eager attention everywhere."""
    from transformers.models.step3p7.configuration_step3p7 import Step3p7Config

    vision = vision_config(hf_config["vision_config"])
    config = Step3p7Config(
        text_config={k: v for k, v in hf_config["text_config"].items() if k != "architectures"},
        vision_config={
            **hf_config["vision_config"],
            "rope_parameters": {"rope_type": "axial", "rope_theta": vision.rope_theta},
        },
        image_token_id=hf_config["image_token_id"],
        projector_bias=bool(hf_config.get("projector_bias", False)),
    )
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = "eager"
    return config


def reference_model(hf_dir: str | Path) -> Any:
    """`Step3p7ForConditionalGeneration` in fp32 with the checkpoint's weights (MTP layers left out)."""
    from transformers.models.step3p7.modeling_step3p7 import Step3p7ForConditionalGeneration

    hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
    config = reference_config(hf_config)
    tensors = released_names(Path(hf_dir))
    text = reference_state_dict(tensors, config.text_config.num_hidden_layers)
    state = {f"model.language_model.{k}": v for k, v in text.items()}
    state |= vision_state_dict(tensors, config.vision_config.num_attention_heads)
    state["lm_head.weight"] = tensors["lm_head.weight"].float()
    model = Step3p7ForConditionalGeneration(config).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BridgeError(f"reference model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    return model


def step37_reference(
    hf_dir: str | Path, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits [batch, seq, vocab] of the HF reference, with images in place of the image tokens."""
    model = reference_model(hf_dir)
    with torch.no_grad():
        return model(input_ids=input_ids, pixel_values=pixel_values).logits.float()


def step37_image_features(hf_dir: str | Path, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image features [images, tokens, hidden] of the HF reference's tower and projector."""
    model = reference_model(hf_dir)
    with torch.no_grad():
        tokens = model.model.vision_model(pixel_values).last_hidden_state
        return model.model.multi_modal_projector(tokens).float()
