"""Checkpoints written by transformers' own model classes, as a user who re-saves a model gets them.

Each model is built from a transformers config unlike our hand-written tiny ones (widths that are
not powers of two, odd layer counts, mixed layer types), given random weights at unit scale (every
matrix N(0, 1/fan_in), so activations keep unit variance through the layers; 1-D params are
transformers' own init plus N(0, 0.05)), rounded to bf16 and written with ``save_pretrained``.
transformers drops the MTP tensors its models do not hold while the config keeps declaring them;
the ``+mtp`` variants add them back in the released layout, as the official checkpoints ship them.
The model that wrote a checkpoint, in fp32 with the same (bf16-representable) values, is its
reference forward.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

#: fixed tokens of the logits comparisons (below every model's image/video token ids).
SEQ = 12


@dataclass(frozen=True)
class Variant:
    """One checkpoint of the conformance matrix."""

    name: str
    build: Callable[[Path], torch.nn.Module]
    moe: bool
    vl: bool


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab - 8, (2, SEQ), generator=torch.Generator().manual_seed(14))


def _unit_scale(model: torch.nn.Module, seed: int) -> None:
    """Every saved float tensor (params and persistent buffers) redrawn at unit scale, bf16-exact."""
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for name, value in model.state_dict(keep_vars=True).items():
            if id(value) in seen or not value.is_floating_point():
                continue
            seen.add(id(value))
            if value.dim() >= 2:
                fan_in = value.shape[-1] if "experts" in name else value[0].numel()
                value.copy_(torch.randn(value.shape, generator=gen) / fan_in**0.5)
            else:
                value.add_(0.05 * torch.randn(value.shape, generator=gen))
            value.copy_(value.bfloat16().float())


def _save(model: torch.nn.Module, out: Path) -> None:
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out)


def _edit(out: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]) -> None:
    """Rewrite the single-file checkpoint in ``out`` with ``edit(tensors, config)`` applied."""
    file = out / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    config = json.loads((out / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, str(file), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _random_like(tensors: dict[str, torch.Tensor], names: dict[str, str], seed: int) -> dict[str, torch.Tensor]:
    """New tensors ``{new: random like tensors[old]}`` at unit scale, in bf16."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for new, old in names.items():
        shape = tensors[old].shape
        value = torch.randn(shape, generator=gen) / (shape[-1] ** 0.5 if len(shape) >= 2 else 20.0)
        out[new] = value.to(torch.bfloat16)
    return out


# -- Step-3.7 and the Step-3.5 text decoder -------------------------------------------------------

STEP_TYPES = ["full_attention", "sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
STEP_MTP_TYPES = ["full_attention"]
STEP_TEXT: dict[str, Any] = {
    "vocab_size": 250,
    "hidden_size": 80,
    "intermediate_size": 88,
    "num_hidden_layers": 5,
    "num_attention_heads": 6,
    "num_attention_groups": 2,
    "head_dim": 20,
    "attention_other_setting": {
        "attention_type": "sliding_attention",
        "num_attention_heads": 4,
        "num_attention_groups": 2,
        "head_dim": 20,
    },
    "layer_types": STEP_TYPES + STEP_MTP_TYPES,
    "sliding_window": 5,
    "rope_theta": [5e6 if t == "full_attention" else 1e4 for t in STEP_TYPES + STEP_MTP_TYPES],
    "partial_rotary_factors": [0.5 if t == "full_attention" else 1.0 for t in STEP_TYPES + STEP_MTP_TYPES],
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 2.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 32.0,
        "original_max_position_embeddings": 8,
    },
    "yarn_only_types": ["full_attention"],
    "max_position_embeddings": 64,
    "moe_num_experts": 6,
    "moe_top_k": 2,
    "moe_intermediate_size": 24,
    "share_expert_dim": 36,
    "moe_layers_enum": "2,3,4",
    "moe_router_scaling_factor": 3.0,
    "swiglu_limits": [0, 0, 0, 0, 1.5, 0],
    "swiglu_limits_shared": [0, 0, 0, 1.0, 0, 0],
    "num_nextn_predict_layers": 1,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
STEP_VISION = {"width": 48, "layers": 2, "heads": 4, "patch_size": 4, "image_size": 16, "mlp_ratio": 2.5}
STEP_IMAGE_TOKEN = 249


def _step37_model(seed: int = 37) -> torch.nn.Module:
    from transformers import Step3p7Config, Step3p7ForConditionalGeneration

    config = Step3p7Config(
        text_config=dict(STEP_TEXT),
        vision_config=dict(STEP_VISION),
        image_token_id=STEP_IMAGE_TOKEN,
        projector_bias=True,
    )
    torch.manual_seed(seed)
    model = Step3p7ForConditionalGeneration(config).eval()
    _unit_scale(model, seed)
    return model


def _step_mtp(tensors: dict[str, torch.Tensor], prefix: str, layers: int, seed: int) -> None:
    """Step-3.5's MTP layer ``layers`` (a dense full-attention layer, enorm/hnorm/eh_proj, shared head)."""
    full, dense = STEP_TYPES.index("full_attention"), 0  # layer 0: full attention and dense
    src = f"{prefix}layers.{full}."
    mtp = f"{prefix}layers.{layers}."
    names = {mtp + k.removeprefix(src): k for k in tensors if k.startswith(src + "self_attn.")}
    src = f"{prefix}layers.{dense}."
    names |= {mtp + k.removeprefix(src): k for k in tensors if k.startswith(src) and ".self_attn." not in k}
    norm = f"{prefix}norm.weight"
    names |= {f"{mtp}enorm.weight": norm, f"{mtp}hnorm.weight": norm, f"{mtp}transformer.shared_head.norm.weight": norm}
    names[f"{mtp}transformer.shared_head.output.weight"] = "lm_head.weight"
    tensors |= _random_like(tensors, names, seed)
    hidden = tensors[norm].shape[0]
    gen = torch.Generator().manual_seed(seed + 1)
    tensors[f"{mtp}eh_proj.weight"] = (torch.randn(hidden, 2 * hidden, generator=gen) / (2 * hidden) ** 0.5).bfloat16()


def build_step37(out: Path) -> torch.nn.Module:
    """Step-3.7 exactly as ``save_pretrained`` writes it: MTP declared, its tensors absent."""
    model = _step37_model()
    _save(model, out)
    return model


def build_step37_mtp(out: Path) -> torch.nn.Module:
    model = build_step37(out)
    _edit(out, lambda t, c: _step_mtp(t, "model.", STEP_TEXT["num_hidden_layers"], seed=371))
    return model


def _step35_text(out: Path, released_spelling: bool) -> torch.nn.Module:
    """The Step-3.5 text decoder (`Step3p5ForCausalLM`): transformers' Step-3.7 model's language part
    under its released names, config.json as transformers writes it or in the released spelling."""
    model = _step37_model(seed=35)
    _save(model, out)

    def edit(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        for name in [k for k in tensors if not k.startswith(("model.", "lm_head."))]:
            del tensors[name]
        text = dict(STEP_TEXT) if released_spelling else dict(config["text_config"])
        text.pop("model_type", None)
        config.clear()
        config.update(architectures=["Step3p5ForCausalLM"], model_type="step3p5", **text, torch_dtype="bfloat16")
        if released_spelling:
            _step_mtp(tensors, "model.", STEP_TEXT["num_hidden_layers"], seed=351)

    _edit(out, edit)
    return model


def build_step35_transformers_keys(out: Path) -> torch.nn.Module:
    return _step35_text(out, released_spelling=False)


def build_step35_released_keys(out: Path) -> torch.nn.Module:
    return _step35_text(out, released_spelling=True)


# -- Qwen3.5 / Qwen3.6 -------------------------------------------------------------------------------

QWEN_TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention"]
QWEN_TEXT: dict[str, Any] = {
    "vocab_size": 230,
    "hidden_size": 96,
    "num_hidden_layers": 5,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "layer_types": QWEN_TYPES,
    "linear_conv_kernel_dim": 3,
    "linear_key_head_dim": 12,
    "linear_value_head_dim": 20,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 6,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 1e6,
        "partial_rotary_factor": 0.5,
        "mrope_interleaved": True,
        "mrope_section": [2, 2, 2],
    },
    "mtp_num_hidden_layers": 1,
    "mtp_use_dedicated_embeddings": False,
}
QWEN_DENSE = {"intermediate_size": 72}
QWEN_MOE = {
    "num_experts": 6,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 20,
    "shared_expert_intermediate_size": 28,
}
QWEN_VISION = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 40,
    "num_heads": 2,
    "patch_size": 4,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "num_position_embeddings": 16,
}
QWEN_TOKENS = {"image_token_id": 229, "video_token_id": 228, "vision_start_token_id": 227, "vision_end_token_id": 226}


def _qwen_model(moe: bool, vl: bool, tied: bool, seed: int) -> torch.nn.Module:
    import transformers

    text = {**QWEN_TEXT, **(QWEN_MOE if moe else QWEN_DENSE), "tie_word_embeddings": tied}
    if vl:
        config_cls = transformers.Qwen3_5MoeConfig if moe else transformers.Qwen3_5Config
        model_cls = (
            transformers.Qwen3_5MoeForConditionalGeneration if moe else transformers.Qwen3_5ForConditionalGeneration
        )
        vision = {**QWEN_VISION, "out_hidden_size": QWEN_TEXT["hidden_size"]}
        config = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=tied, **QWEN_TOKENS)
    else:
        config_cls = transformers.Qwen3_5MoeTextConfig if moe else transformers.Qwen3_5TextConfig
        model_cls = transformers.Qwen3_5MoeForCausalLM if moe else transformers.Qwen3_5ForCausalLM
        config = config_cls(**text)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _unit_scale(model, seed)
    return model


def _expert_form(tensors: dict[str, torch.Tensor], packed: bool) -> None:
    """Rewrite every MoE layer's experts packed (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj`
    [E, H, I]) or per expert (`experts.{e}.{gate,up,down}_proj.weight`), in place."""
    if packed:
        for name in [k for k in tensors if k.endswith(".experts.0.gate_proj.weight")]:
            base = name.removesuffix("0.gate_proj.weight")
            count = sum(1 for k in tensors if k.startswith(base) and k.endswith(".gate_proj.weight"))
            parts = {
                p: [tensors.pop(f"{base}{e}.{p}_proj.weight") for e in range(count)] for p in ("gate", "up", "down")
            }
            tensors[f"{base}gate_up_proj"] = torch.stack(
                [torch.cat([g, u]) for g, u in zip(parts["gate"], parts["up"], strict=True)]
            )
            tensors[f"{base}down_proj"] = torch.stack(parts["down"])
    else:
        for name in [k for k in tensors if k.endswith(".experts.gate_up_proj")]:
            base = name.removesuffix("gate_up_proj")
            gate_up, down = tensors.pop(name), tensors.pop(f"{base}down_proj")
            for e in range(gate_up.shape[0]):
                gate, up = gate_up[e].chunk(2)
                tensors |= {f"{base}{e}.gate_proj.weight": gate, f"{base}{e}.up_proj.weight": up}
                tensors[f"{base}{e}.down_proj.weight"] = down[e]


def _qwen_mtp(tensors: dict[str, torch.Tensor], prefix: str, seed: int) -> None:
    """Qwen3.5's MTP block: fc, the two pre-fc norms, one full-attention layer, the final norm."""
    full = QWEN_TYPES.index("full_attention")
    src = f"{prefix}layers.{full}."
    names = {f"mtp.layers.0.{k.removeprefix(src)}": k for k in tensors if k.startswith(src)}
    norm = f"{prefix}norm.weight"
    names |= {f"mtp.{n}.weight": norm for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")}
    tensors |= _random_like(tensors, names, seed)
    hidden = tensors[norm].shape[0]
    gen = torch.Generator().manual_seed(seed + 1)
    tensors["mtp.fc.weight"] = (torch.randn(hidden, 2 * hidden, generator=gen) / (2 * hidden) ** 0.5).bfloat16()


def _qwen(moe: bool, vl: bool, tied: bool, mtp: bool, packed: bool | None, seed: int) -> Callable[[Path], Any]:
    def build(out: Path) -> torch.nn.Module:
        model = _qwen_model(moe, vl, tied, seed)
        _save(model, out)

        def edit(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
            if packed is not None:
                _expert_form(tensors, packed)
            if mtp:
                _qwen_mtp(tensors, "model.language_model." if vl else "model.", seed + 2)

        if mtp or packed is not None:
            _edit(out, edit)
        return model

    return build


VARIANTS = [
    Variant("step37", build_step37, moe=True, vl=True),
    Variant("step37+mtp", build_step37_mtp, moe=True, vl=True),
    Variant("step35-transformers-keys", build_step35_transformers_keys, moe=True, vl=False),
    Variant("step35-released-keys+mtp", build_step35_released_keys, moe=True, vl=False),
    Variant("qwen35-dense-tied", _qwen(False, False, True, False, None, 351), moe=False, vl=False),
    Variant("qwen35-dense+mtp", _qwen(False, False, False, True, None, 352), moe=False, vl=False),
    Variant("qwen35-moe", _qwen(True, False, False, False, None, 353), moe=True, vl=False),
    Variant("qwen35-moe-packed-tied+mtp", _qwen(True, False, True, True, True, 354), moe=True, vl=False),
    Variant("qwen35-vl+mtp", _qwen(False, True, False, True, None, 355), moe=False, vl=True),
    Variant("qwen35-moe-vl", _qwen(True, True, False, False, None, 356), moe=True, vl=True),
    Variant("qwen35-moe-vl-packed-tied+mtp", _qwen(True, True, True, True, True, 357), moe=True, vl=True),
]
