"""Run under torchrun (gloo, CPU): a Megatron LoRA fine-tuning checkpoint, as a training run leaves it.

Usage: torchrun --nproc-per-node N adapter_worker.py HF_DIR OUT_DIR TP EP WHICH

The base model is built at TP/EP from HF_DIR (fp32), Megatron-Bridge's adapters (rank 4, alpha 8)
are put on the linears of TARGETS (WHICH: "dense" leaves out the routed experts, "experts" takes only
them, "all" both; "+dora" makes them DoRA adapters, with a magnitude per output row), given
random values per rank, and saved alone with megatron-core's own ``dist_checkpointing.save`` into
OUT_DIR/release. Rank 0 saves the logits of fixed tokens with the (LoRA) adapters, gathered over TP,
as OUT_DIR/logits.pt.
"""

from __future__ import annotations

import sys
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from bridgecore import AutoBridge
from bridgecore.megatron.adapters import Adapted, adapt, adapted_module, split_dim
from bridgecore.megatron.compat import cpu_compat
from bridgecore.megatron.parallel import Layout
from bridgecore.megatron.params import local_tensors
from bridgecore.megatron.state import sharded_state_dict

RANK, ALPHA = 4, 8.0
#: the linears a Megatron-Bridge LoRA run adapts (its default four, and the GDN projections)
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj")


def tokens(vocab: int) -> torch.Tensor:
    return torch.arange(2 * 16).reshape(2, 16) * 7 % (vocab - 8)


def main(hf: Path, out: Path, tp: int, ep: int, which: str) -> None:
    which, _, dora = which.partition("+")
    bridge = AutoBridge.from_hf_pretrained(hf, params_dtype=torch.float32)
    model = bridge.to_megatron_model(Layout(tp=tp, ep=ep, etp=1))
    modules = dict(model[0].named_modules())
    targets = []
    for t in local_tensors(model, bridge.config):
        local = t.local_name.removesuffix(".weight")
        module = t.name.removesuffix(".weight")
        if not t.name.endswith(".weight") or local not in modules or split_dim(modules[local]) is None:
            continue
        # MTP heads left out, as Megatron-Bridge's export is told to (transformers' models have none)
        if not local.endswith(TARGETS) or module.startswith("mtp."):
            continue
        if which != "all" and t.expert != (which == "experts"):
            continue
        targets.append(((0, local), Adapted(module, RANK, ALPHA, dora == "dora")))
    adapt(model, targets)
    with torch.no_grad():
        for t in local_tensors(model, bridge.config):
            if adapted_module(t.name) is not None:
                gen = torch.Generator().manual_seed(zlib.crc32(f"{t.name}:{t.shard.rank}".encode()))
                if t.tensor.dim() == 1:  # a DoRA magnitude: positive, about a row norm
                    t.tensor.copy_(torch.rand(t.tensor.shape, generator=gen) + 0.5)
                else:
                    t.tensor.copy_(torch.randn(t.tensor.shape, generator=gen) / t.tensor.shape[1] ** 0.5)
    from megatron.core import dist_checkpointing

    state = {k: v for k, v in sharded_state_dict(model[0]).items() if ".adapter." in k}
    if dist.get_rank() == 0:
        (out / "release").mkdir(parents=True)
        (out / "latest_checkpointed_iteration.txt").write_text("release")
    dist.barrier()
    with cpu_compat():
        dist_checkpointing.save(state, str(out / "release"))
        if dora:  # no DoRA forward here
            return
        with torch.no_grad():
            logits = bridge.config.forward_logits(model[0], tokens(bridge.config.vocab_size))
    if dist.get_rank() == 0:
        torch.save(logits, out / "logits.pt")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    hf_dir, out_dir, tp, ep, which = sys.argv[1:]
    main(Path(hf_dir), Path(out_dir), int(tp), int(ep), which)
