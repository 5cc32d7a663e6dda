"""Helpers shared by the qwen35 tests (a module of its own: every test folder has a conftest)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from bridgecore_qwen35 import tiny
from bridgecore_qwen35.reference import reference_model

VARIANTS = {"dense": tiny.write_dense, "moe": tiny.write_moe, "moe-vl": tiny.write_moe_vl}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def reference_mtp_logits(hf_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the checkpoint's MTP head, for positions 0..seq-2, built here from transformers'
    modules: its CausalLM classes have no MTP. Written from the released model's MTP module (as vLLM
    runs it): at position t it takes the main model's final hidden state h_t and the embedding of
    token t+1, and gives norm(layer(fc([pre_fc_norm_embedding(e); pre_fc_norm_hidden(h)]))) to the
    LM head; its one layer is a full-attention decoder layer at the same positions.
    """
    model = reference_model(hf_dir, torch.float32)
    config, text = model.config, model.model
    full = config.layer_types.index("full_attention")
    tensors = {k: v.float() for k, v in read_tensors(hf_dir).items() if k.startswith("mtp.")}
    layer_state, experts = {}, {}
    for name, tensor in tensors.items():
        key = name.removeprefix("mtp.layers.0.")
        if key == name:
            continue
        per_expert = re.fullmatch(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", key)
        if per_expert:  # transformers packs them: gate_up_proj [E, 2I, H], down_proj [E, H, I]
            experts.setdefault(per_expert[2], {})[int(per_expert[1])] = tensor
        else:
            layer_state[key] = tensor
    if experts:
        count = range(len(experts["gate"]))
        layer_state["mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts["gate"][e], experts["up"][e]]) for e in count]
        )
        layer_state["mlp.experts.down_proj"] = torch.stack([experts["down"][e] for e in count])
    layer = type(text.layers[full])(config, full).float().eval()
    layer.load_state_dict(layer_state, strict=True)

    def norm(name: str) -> torch.nn.Module:
        module = type(text.norm)(config.hidden_size, eps=config.rms_norm_eps).float()
        module.load_state_dict({"weight": tensors[name]})
        return module

    batch, seq = input_ids.shape
    positions = torch.arange(seq).expand(batch, seq)
    causal = torch.full((seq, seq), float("-inf")).triu(1).expand(batch, 1, seq, seq)
    with torch.no_grad():
        hidden = text(input_ids=input_ids).last_hidden_state
        embedded = text.embed_tokens(input_ids.roll(-1, dims=-1))
        joined = torch.cat(
            [norm("mtp.pre_fc_norm_embedding.weight")(embedded), norm("mtp.pre_fc_norm_hidden.weight")(hidden)], -1
        )
        x = torch.nn.functional.linear(joined, tensors["mtp.fc.weight"])
        x = layer(x, position_embeddings=text.rotary_emb(x, positions), attention_mask=causal, position_ids=positions)
        logits = model.lm_head(norm("mtp.norm.weight")(x))
    return logits[:, :-1]
