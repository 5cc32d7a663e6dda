"""Soak worker (run under torchrun): round trip random tiny Llama configs over and over in one process.

Prints one JSON line per iteration on rank 0: the iteration, its layout, bit-exactness and the
RSS after it (max over ranks).
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from bridgecore import AutoBridge
from bridgecore.compare import compare_checkpoints
from bridgecore.megatron import parallel
from bridgecore.megatron.parallel import Layout
from bridgecore.tiny import random_tensor, write_checkpoint
from bridgecore_llama_example import TINY_CONFIG

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def random_config(rng: random.Random, tp: int) -> dict:
    groups = 2 if tp == 2 else rng.choice([1, 2])
    return dict(
        TINY_CONFIG,
        architectures=["LlamaForCausalLM"],
        num_hidden_layers=rng.choice([2, 4]),
        num_key_value_heads=groups,
        num_attention_heads=groups * rng.choice([1, 2]),
        head_dim=rng.choice([8, 16]),
        hidden_size=rng.choice([32, 64]),
        intermediate_size=rng.choice([64, 96]),
        vocab_size=rng.choice([64, 128]),
        tie_word_embeddings=rng.random() < 0.5,
        dtype=rng.choice(list(DTYPES)),
    )


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama checkpoint with config ``cfg``, in HF order, with its shape."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    shapes["model.norm.weight"] = (h,)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def write_random(out: Path, cfg: dict, seed: int) -> None:
    g, dtype = torch.Generator().manual_seed(seed), DTYPES[cfg["dtype"]]
    shapes = tensor_shapes(cfg)
    write_checkpoint(out, cfg, {n: random_tensor(s, dtype, g) for n, s in shapes.items()}, shards=2)


def step35_case(it: int) -> tuple[Callable[[Path], None], Layout, dict] | None:
    """Every fifth iteration, when the step35 plugin is installed: its MoE tiny (seeded) at TP, EP or DP."""
    try:
        from bridgecore_step35.tiny import write_tiny
    except ImportError:
        return None
    if it % 5 != 4:
        return None
    layout = [Layout(tp=2), Layout(ep=2), Layout()][(it // 5) % 3]
    return (lambda out: write_tiny(out, seed=it)), layout, {"plugin": "step35"}


def llama_case(it: int) -> tuple[Callable[[Path], None], Layout, dict]:
    layout = [Layout(), Layout(tp=2), Layout(pp=2)][it % 3]
    cfg = random_config(random.Random(it), layout.tp)
    shown = (
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_size",
        "vocab_size",
        "tie_word_embeddings",
        "dtype",
    )
    return (lambda out: write_random(out, cfg, seed=it)), layout, {k: cfg[k] for k in shown}


def main(iterations: int) -> None:
    parallel.init_distributed()
    work = Path(
        parallel.broadcast_object(tempfile.mkdtemp(prefix="bridgecore-soak-") if parallel.rank() == 0 else None)
    )
    for it in range(iterations):
        write, layout, described = step35_case(it) or llama_case(it)
        src, out = work / f"hf-{it}", work / f"out-{it}"
        if parallel.rank() == 0:
            write(src)
        parallel.broadcast_object(None)  # the checkpoint exists before any rank reads it
        bridge = AutoBridge.from_hf_pretrained(src)
        model = bridge.to_megatron_model(layout)
        bridge.save_hf_pretrained(model, out)
        del model, bridge
        exact = compare_checkpoints(src, out).exact if parallel.rank() == 0 else None
        rss = max(parallel.all_gather_objects(psutil.Process().memory_info().rss))
        if parallel.rank() == 0:
            shutil.rmtree(src)
            shutil.rmtree(out)
            row = {"iteration": it, "layout": str(layout), "exact": exact, "rss": rss, "config": described}
            print(json.dumps(row), flush=True)
    if parallel.rank() == 0:
        shutil.rmtree(work)


if __name__ == "__main__":
    main(int(sys.argv[1]))
