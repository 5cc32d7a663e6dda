"""Run under torchrun (gloo, CPU): convert each tiny checkpoint HF -> Megatron -> HF at several layouts.

Usage: torchrun --nproc-per-node 2 qwen35_roundtrip_worker.py OUT_DIR SRC_DIR [SRC_DIR ...]
Every layout converts with fp32 params (bf16 -> fp32 -> bf16 is exact) and rank 0 saves the logits of
fixed tokens, gathered over TP; one run per source also keeps the checkpoint's own dtype (bf16 params,
GDN decay and norm in fp32). Each export goes to OUT_DIR/<source name>-tp<T>-ep<E>[-native].
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from bridgecore import AutoBridge
from bridgecore.megatron.compat import cpu_compat
from bridgecore.megatron.parallel import Layout

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def layouts(source: str) -> list[tuple[int, int]]:
    return [(tp, ep) for tp, ep in LAYOUTS if ep == 1 or "moe" in source]


def parity_tokens() -> torch.Tensor:
    """Two sequences of 70 tokens: more than one 64-token chunk of the delta rule."""
    return torch.arange(2 * 70).reshape(2, 70) * 7 % 124


def gathered_logits(bridge: AutoBridge, model: list[torch.nn.Module]) -> torch.Tensor:
    with cpu_compat(), torch.no_grad():
        return bridge.config.forward_logits(model[0], parity_tokens())


def convert(src: Path, target: Path, tp: int, ep: int, params_dtype: torch.dtype | None) -> None:
    bridge = AutoBridge.from_hf_pretrained(src, params_dtype=params_dtype)
    model = bridge.to_megatron_model(Layout(tp=tp, ep=ep))
    bridge.save_hf_pretrained(model, target)
    if params_dtype == torch.float32:
        logits = gathered_logits(bridge, model)
        if dist.get_rank() == 0:
            torch.save(logits, target / "logits.pt")


def main(out: Path, sources: list[Path]) -> None:
    warnings.filterwarnings("ignore")
    for src in sources:
        for tp, ep in layouts(src.name):
            convert(src, out / f"{src.name}-tp{tp}-ep{ep}", tp, ep, torch.float32)
        tp, ep = layouts(src.name)[-1]
        convert(src, out / f"{src.name}-tp{tp}-ep{ep}-native", tp, ep, None)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
