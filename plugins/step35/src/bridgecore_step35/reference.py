"""The reference forward: transformers' own Step-3.5 text decoder, built from the plain config.

transformers 5.23 ships the Step-3.5 decoder as `Step3p7TextModel` (config `Step3p7TextConfig`,
model_type `step3p5`). Its module names differ from the released on-disk layout, so the weights are
renamed here, explicitly: the router is `mlp.gate` with the bias as `e_score_correction_bias`, the
stacked experts are one `gate_up_proj` [E, 2I, H] (gate rows first), the shared expert is
`mlp.shared_experts`. It runs the decoder layers only (the MTP layers are not part of its
forward); logits are `lm_head` applied to the final norm's output, in fp32.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from bridgecore.plugin import BridgeError

_MOE_RENAMES = {
    "moe.gate.weight": "mlp.gate.weight",
    "moe.router_bias": "mlp.gate.e_score_correction_bias",
    "moe.down_proj.weight": "mlp.experts.down_proj",
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _read_all(hf_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def reference_state_dict(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """On-disk Step-3.5 names -> `Step3p7TextModel` names (decoder layers only), in fp32."""
    out: dict[str, torch.Tensor] = {}
    stacked: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        tensor = tensor.float()
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            out[name.removeprefix("model.")] = tensor
            continue
        m = _LAYER.fullmatch(name)
        if m is None or int(m.group(1)) >= num_layers:
            continue  # lm_head, and the MTP layers the reference does not run
        layer, rest = int(m.group(1)), m.group(2)
        if rest in ("moe.gate_proj.weight", "moe.up_proj.weight"):
            stacked.setdefault(layer, {})[rest] = tensor
        elif rest in _MOE_RENAMES:
            out[f"layers.{layer}.{_MOE_RENAMES[rest]}"] = tensor
        elif rest.startswith("share_expert."):
            out[f"layers.{layer}.mlp.shared_experts.{rest.removeprefix('share_expert.')}"] = tensor
        else:
            out[f"layers.{layer}.{rest}"] = tensor
    for layer, parts in stacked.items():
        gate_up = torch.cat([parts["moe.gate_proj.weight"], parts["moe.up_proj.weight"]], dim=1)
        out[f"layers.{layer}.mlp.experts.gate_up_proj"] = gate_up
    return out


def reference_config(hf_config: dict[str, Any]) -> Any:
    """`Step3p7TextConfig` from the plain config.json dict (no remote code), eager fp32 attention."""
    from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig

    cfg = {k: v for k, v in hf_config.items() if k not in ("architectures", "model_type", "auto_map")}
    config = Step3p7TextConfig(**cfg)
    config._attn_implementation = "eager"
    return config


def step35_reference(hf_dir: str | Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] of the HF reference for the checkpoint in `hf_dir`, in fp32."""
    from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

    hf_dir = Path(hf_dir)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    config = reference_config(hf_config)
    tensors = _read_all(hf_dir)
    with torch.device("meta"):
        model = Step3p7TextModel(config)
    state = reference_state_dict(tensors, config.num_hidden_layers)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise BridgeError(f"reference model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    model.rotary_emb = type(model.rotary_emb)(config)  # its inv_freq buffers are not in the checkpoint
    model.eval()
    with torch.no_grad():
        hidden = model(input_ids=input_ids).last_hidden_state
        head = tensors["lm_head.weight"] if "lm_head.weight" in tensors else tensors["model.embed_tokens.weight"]
        return hidden @ head.float().T
