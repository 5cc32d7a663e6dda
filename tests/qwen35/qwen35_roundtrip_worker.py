"""Run under torchrun (gloo, CPU): convert each tiny checkpoint HF -> Megatron -> HF at several layouts.

Usage: torchrun --nproc-per-node 2 qwen35_roundtrip_worker.py OUT_DIR SRC_DIR [SRC_DIR ...]
Every layout converts with fp32 params (bf16 -> fp32 -> bf16 is exact) and rank 0 saves the logits of
fixed tokens, gathered over TP, of the main head and of the MTP head; one run per source also keeps the
checkpoint's own dtype (bf16 params, GDN decay and norm in fp32).
Each export goes to OUT_DIR/<source name>-tp<T>-ep<E>[-native].
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from bridgecore import AutoBridge
from bridgecore.megatron.compat import cpu_compat
from bridgecore.megatron.config import gather_vocab
from bridgecore.megatron.parallel import Layout
from bridgecore_qwen35.gdn import torch_gdn_kernels

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def layouts(source: str) -> list[tuple[int, int]]:
    return [(tp, ep) for tp, ep in LAYOUTS if ep == 1 or "moe" in source]


def parity_tokens() -> torch.Tensor:
    """Two sequences of 70 tokens: more than one 64-token chunk of the delta rule."""
    return torch.arange(2 * 70).reshape(2, 70) * 7 % 124


def gathered_logits(bridge: AutoBridge, model: list[torch.nn.Module]) -> torch.Tensor:
    with cpu_compat(), torch.no_grad():
        return bridge.config.forward_logits(model[0], parity_tokens())


def gathered_mtp_logits(model: list[torch.nn.Module]) -> torch.Tensor:
    """The MTP head's logits [batch, seq, vocab] for the parity tokens, gathered over TP.

    GPTModel runs its MTP block only to add the training loss: the forward is given labels, the
    block's output (the main hidden states, then the MTP layer's) is caught on its way to the loss,
    and the MTP part goes through the output layer as the loss does.
    """
    gpt = model[0]
    tokens = parity_tokens()
    batch, seq = tokens.shape
    caught = []
    hook = gpt.mtp.register_forward_hook(lambda module, args, out: caught.append(out))
    try:
        with cpu_compat(), torch_gdn_kernels(), torch.no_grad():
            gpt(
                input_ids=tokens,
                position_ids=torch.arange(seq).expand(batch, seq),
                attention_mask=torch.ones(seq, seq, dtype=torch.bool).triu(1).view(1, 1, seq, seq),
                labels=tokens,
            )
            _, mtp_hidden = caught[0].chunk(2, dim=0)
            weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
            logits, _ = gpt.output_layer(mtp_hidden, weight=weight)
            return gather_vocab(logits).transpose(0, 1)
    finally:
        hook.remove()


def convert(src: Path, target: Path, tp: int, ep: int, params_dtype: torch.dtype | None) -> None:
    bridge = AutoBridge.from_hf_pretrained(src, params_dtype=params_dtype)
    model = bridge.to_megatron_model(Layout(tp=tp, ep=ep))
    bridge.save_hf_pretrained(model, target)
    if params_dtype == torch.float32:
        logits = gathered_logits(bridge, model)
        mtp_logits = gathered_mtp_logits(model)
        if dist.get_rank() == 0:
            torch.save(logits, target / "logits.pt")
            torch.save(mtp_logits, target / "mtp_logits.pt")


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
