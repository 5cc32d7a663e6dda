"""Tiny Qwen3.5 / Qwen3.6 checkpoints in the released on-disk layouts.

Each keeps the structural features of its release at hidden size 64: three GDN layers then one gated
full-attention layer (``full_attention_interval`` 4), partial RoPE, one MTP layer, GDN heads that
TP=2 splits (2 key heads, 4 value heads), 4 experts with a gated shared expert, a vocabulary that
divides by 4. Values are random but shaped like a trained model's where it matters: ``A_log`` is the
log of a decay in [1, 16] stored in fp32 as released, the GDN output norm is near 1, every other
norm near 0 (zero-centered).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from bridgecore.plugin import TinyModel, random_tensor, write_checkpoint

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
K_HEADS, V_HEADS, K_DIM, V_DIM, CONV = 2, 4, 16, 16, 4
LAYERS, VOCAB, INTERMEDIATE = 4, 128, 128
EXPERTS, TOPK, MOE_INTERMEDIATE, SHARED_INTERMEDIATE = 4, 2, 32, 32
STD = 0.1


def _text_config(moe: bool) -> dict[str, Any]:
    config: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "attn_output_gate": True,
        "output_gate_type": "swish",
        "full_attention_interval": 4,
        "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(LAYERS)],
        "linear_conv_kernel_dim": CONV,
        "linear_key_head_dim": K_DIM,
        "linear_value_head_dim": V_DIM,
        "linear_num_key_heads": K_HEADS,
        "linear_num_value_heads": V_HEADS,
        "mamba_ssm_dtype": "float32",
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "partial_rotary_factor": 0.25,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_interleaved": True,
            "mrope_section": [1, 1, 0],
        },
        "dtype": "bfloat16",
    }
    if moe:
        config.update(
            num_experts=EXPERTS,
            num_experts_per_tok=TOPK,
            moe_intermediate_size=MOE_INTERMEDIATE,
            shared_expert_intermediate_size=SHARED_INTERMEDIATE,
            router_aux_loss_coef=0.001,
        )
    else:
        config["intermediate_size"] = INTERMEDIATE
    return config


class _Writer:
    """Random tensors under their released names, drawn in a fixed order from one seed."""

    def __init__(self, dtype: torch.dtype, seed: int):
        self.dtype, self.gen, self.tensors = dtype, torch.Generator().manual_seed(seed), {}

    def weight(self, name: str, *shape: int, std: float = STD) -> None:
        self.tensors[name] = random_tensor(shape, self.dtype, self.gen, std=std)

    def norm(self, name: str, size: int, centre: float = 0.0) -> None:
        self.tensors[name] = (centre + random_tensor((size,), torch.float32, self.gen, std=0.05)).to(self.dtype)

    def gdn(self, p: str) -> None:
        key, value = K_HEADS * K_DIM, V_HEADS * V_DIM
        self.weight(f"{p}in_proj_qkv.weight", 2 * key + value, HIDDEN)
        self.weight(f"{p}in_proj_z.weight", value, HIDDEN)
        self.weight(f"{p}in_proj_b.weight", V_HEADS, HIDDEN)
        self.weight(f"{p}in_proj_a.weight", V_HEADS, HIDDEN)
        self.weight(f"{p}conv1d.weight", 2 * key + value, 1, CONV, std=0.3)
        decay = torch.empty(V_HEADS).uniform_(1, 16, generator=self.gen)
        self.tensors[f"{p}A_log"] = torch.log(decay)  # fp32 in the released checkpoints
        self.norm(f"{p}dt_bias", V_HEADS, centre=1.0)
        self.norm(f"{p}norm.weight", V_DIM, centre=1.0)  # plain (not zero-centered) gated RMSNorm
        self.weight(f"{p}out_proj.weight", HIDDEN, value)

    def attention(self, p: str) -> None:
        self.weight(f"{p}q_proj.weight", 2 * HEADS * HEAD_DIM, HIDDEN)  # per head [q_h; gate_h]
        self.weight(f"{p}k_proj.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        self.weight(f"{p}v_proj.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        self.weight(f"{p}o_proj.weight", HIDDEN, HEADS * HEAD_DIM)
        self.norm(f"{p}q_norm.weight", HEAD_DIM)
        self.norm(f"{p}k_norm.weight", HEAD_DIM)

    def dense_mlp(self, p: str, size: int) -> None:
        self.weight(f"{p}gate_proj.weight", size, HIDDEN)
        self.weight(f"{p}up_proj.weight", size, HIDDEN)
        self.weight(f"{p}down_proj.weight", HIDDEN, size)

    def moe(self, p: str, packed: bool) -> None:
        self.weight(f"{p}gate.weight", EXPERTS, HIDDEN)
        if packed:  # transformers 5 / Qwen3.6: [E, 2I, H] gate rows first, and [E, H, I]
            self.weight(f"{p}experts.gate_up_proj", EXPERTS, 2 * MOE_INTERMEDIATE, HIDDEN)
            self.weight(f"{p}experts.down_proj", EXPERTS, HIDDEN, MOE_INTERMEDIATE)
        else:
            for e in range(EXPERTS):
                self.dense_mlp(f"{p}experts.{e}.", MOE_INTERMEDIATE)
        self.dense_mlp(f"{p}shared_expert.", SHARED_INTERMEDIATE)
        self.weight(f"{p}shared_expert_gate.weight", 1, HIDDEN)

    def layer(self, p: str, full_attention: bool, moe: bool, packed: bool) -> None:
        self.norm(f"{p}input_layernorm.weight", HIDDEN)
        if full_attention:
            self.attention(f"{p}self_attn.")
        else:
            self.gdn(f"{p}linear_attn.")
        self.norm(f"{p}post_attention_layernorm.weight", HIDDEN)
        if moe:
            self.moe(f"{p}mlp.", packed)
        else:
            self.dense_mlp(f"{p}mlp.", INTERMEDIATE)

    def vision(self, p: str, width: int = 16) -> None:
        """A one-block vision tower with the released names: carried by VL checkpoints, not converted."""
        self.weight(f"{p}patch_embed.proj.weight", width, 3, 2, 4, 4)
        self.weight(f"{p}patch_embed.proj.bias", width)
        self.weight(f"{p}pos_embed.weight", 16, width)
        b = f"{p}blocks.0."
        for norm in ("norm1", "norm2"):
            self.norm(f"{b}{norm}.weight", width, centre=1.0)
            self.weight(f"{b}{norm}.bias", width)
        for name, rows, cols in (
            ("attn.qkv", 3 * width, width),
            ("attn.proj", width, width),
            ("mlp.linear_fc1", 2 * width, width),
            ("mlp.linear_fc2", width, 2 * width),
        ):
            self.weight(f"{b}{name}.weight", rows, cols)
            self.weight(f"{b}{name}.bias", rows)
        self.norm(f"{p}merger.norm.weight", width, centre=1.0)
        self.weight(f"{p}merger.norm.bias", width)
        self.weight(f"{p}merger.linear_fc1.weight", 4 * width, 4 * width)
        self.weight(f"{p}merger.linear_fc1.bias", 4 * width)
        self.weight(f"{p}merger.linear_fc2.weight", HIDDEN, 4 * width)
        self.weight(f"{p}merger.linear_fc2.bias", HIDDEN)


def _tensors(
    prefix: str, moe: bool, packed: bool, mtp_packed: bool, tied: bool, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    w = _Writer(dtype, seed)
    w.weight(f"{prefix}embed_tokens.weight", VOCAB, HIDDEN, std=1.0 / math.sqrt(HIDDEN))
    for i in range(LAYERS):
        w.layer(f"{prefix}layers.{i}.", full_attention=(i + 1) % 4 == 0, moe=moe, packed=packed)
    w.norm(f"{prefix}norm.weight", HIDDEN)
    if not tied:
        w.weight("lm_head.weight", VOCAB, HIDDEN)
    w.weight("mtp.fc.weight", HIDDEN, 2 * HIDDEN)
    w.norm("mtp.pre_fc_norm_embedding.weight", HIDDEN)
    w.norm("mtp.pre_fc_norm_hidden.weight", HIDDEN)
    w.layer("mtp.layers.0.", full_attention=True, moe=moe, packed=mtp_packed)
    w.norm("mtp.norm.weight", HIDDEN)
    return w.tensors


def write_dense(out: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Qwen3.5 dense, text-only (`Qwen3_5ForCausalLM`), tied embeddings as in the small releases."""
    config = {
        "architectures": ["Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5_text",
        **_text_config(moe=False),
        "tie_word_embeddings": True,
    }
    config["dtype"] = str(dtype).removeprefix("torch.")
    write_checkpoint(out, config, _tensors("model.", False, False, False, True, dtype, seed=35))


def write_moe(out: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Qwen3.5 MoE, text-only (`Qwen3_5MoeForCausalLM`), per-expert tensors (decoder and MTP), untied."""
    config = {
        "architectures": ["Qwen3_5MoeForCausalLM"],
        "model_type": "qwen3_5_moe_text",
        **_text_config(moe=True),
        "tie_word_embeddings": False,
    }
    config["dtype"] = str(dtype).removeprefix("torch.")
    write_checkpoint(out, config, _tensors("model.", True, False, False, False, dtype, seed=36))


def write_moe_vl(out: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Qwen3.6 MoE as released: VL wrapper (`model.language_model.`), packed experts incl. MTP, vision tower."""
    text = {**_text_config(moe=True), "model_type": "qwen3_5_moe_text", "tie_word_embeddings": False}
    text["dtype"] = str(dtype).removeprefix("torch.")
    config = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "vision_config": {
            "model_type": "qwen3_5_moe_vision",
            "depth": 1,
            "hidden_size": 16,
            "num_heads": 2,
            "intermediate_size": 32,
            "patch_size": 4,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "out_hidden_size": HIDDEN,
            "num_position_embeddings": 16,
        },
        "image_token_id": VOCAB - 4,
        "video_token_id": VOCAB - 3,
        "vision_start_token_id": VOCAB - 2,
        "vision_end_token_id": VOCAB - 1,
        "tie_word_embeddings": False,
    }
    tensors = _tensors("model.language_model.", True, True, True, False, dtype, seed=37)
    w = _Writer(dtype, seed=38)
    w.vision("model.visual.")
    write_checkpoint(out, config, {**tensors, **w.tensors}, shards=3)


TINY_MODELS = [
    TinyModel(
        "qwen35-dense", "Qwen3.5 dense: 3 GDN + 1 gated attention layer, dense MLP, MTP, tied embeddings", write_dense
    ),
    TinyModel(
        "qwen35-moe", "Qwen3.5 MoE: hybrid GDN, 4 experts per-expert on disk + gated shared expert, MTP", write_moe
    ),
    TinyModel(
        "qwen36-moe-vl",
        "Qwen3.6 MoE VL: language model under model.language_model., packed experts"
        " (decoder and MTP), vision tower (not converted)",
        write_moe_vl,
    ),
]
