"""The reference forward for `bridgecore verify`: transformers' own Qwen3.5 text models on CPU.

`Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM` are built from the (text) config dict; no remote code.
The weights are read from the checkpoint and renamed to those classes' parameters: the VL prefix
`model.language_model.` becomes `model.`, per-expert tensors are stacked into transformers' packed
experts, and `mtp.*` / `model.visual.*` are left out (the CausalLM classes have neither).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from bridgecore.plugin import BridgeError
from bridgecore_qwen35.provider import text_config

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _read(hf_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensors[name] = f.get_tensor(name)
    return tensors


def _text_state(tensors: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    state, experts = {}, {}
    for name, tensor in tensors.items():
        if name.startswith(("mtp.", "model.visual.")):
            continue
        name = name.replace("model.language_model.", "model.", 1)
        m = _EXPERT.match(name)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = tensor
        else:
            state[name] = tensor
    for (prefix, proj), per_expert in experts.items():
        if sorted(per_expert) != list(range(num_experts)):
            raise BridgeError(f"{prefix}: found experts {sorted(per_expert)}, expected 0..{num_experts - 1}")
        if proj == "down_proj":
            state[f"{prefix}.down_proj"] = torch.stack([per_expert[e] for e in range(num_experts)])
    for (prefix, proj), per_expert in experts.items():
        if proj == "gate_proj":
            up = experts[(prefix, "up_proj")]
            state[f"{prefix}.gate_up_proj"] = torch.stack(
                [torch.cat([per_expert[e], up[e]]) for e in range(num_experts)]
            )
    return state


def reference_model(hf_dir: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """transformers' Qwen3.5 CausalLM for the checkpoint in `hf_dir`, weights loaded, in eval mode.

    Parameters are in `dtype`, by default the checkpoint's. The model is built in that dtype rather
    than cast afterwards, which would also round its RoPE frequencies.
    """
    import transformers

    hf_dir = Path(hf_dir)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    text = dict(text_config(hf_config))
    moe = bool(text.get("num_experts"))
    config_cls = transformers.Qwen3_5MoeTextConfig if moe else transformers.Qwen3_5TextConfig
    model_cls = transformers.Qwen3_5MoeForCausalLM if moe else transformers.Qwen3_5ForCausalLM
    for key in ("architectures", "model_type", "auto_map"):
        text.pop(key, None)
    text["tie_word_embeddings"] = hf_config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    config = config_cls(**text)
    config._attn_implementation = "eager"
    dtype = dtype or getattr(torch, str(text.get("dtype") or "bfloat16"))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = model_cls(config)
    finally:
        torch.set_default_dtype(default)
    state = _text_state(_read(hf_dir), text.get("num_experts", 0))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise BridgeError(f"{hf_dir}: reference model is missing {missing} and does not take {unexpected}")
    return model.eval()


def reference_logits(hf_dir: str | Path, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits [batch, seq, vocab] of transformers' model for `input_ids` (verify runs Megatron in fp32)."""
    model = reference_model(hf_dir, torch.float32)
    with torch.no_grad():
        return model(input_ids=input_ids).logits
