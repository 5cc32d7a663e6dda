"""One conversion of the tiny checkpoint at a TP/EP layout: logits vs the HF reference, then HF export.

Run in-process (world size 1) through `run`, or under `torchrun --nproc-per-node N` as a script:
`python step35_roundtrip_worker.py SRC OUT TP EP`. Rank 0 writes `OUT/result.json` with the max abs logit
difference and the tensors whose exported bytes differ from the source.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from step35_testing import read_tensors

from bridgecore import AutoBridge
from bridgecore.megatron import parallel
from bridgecore.megatron.compat import cpu_compat
from bridgecore_step35.reference import step35_reference

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))


def run(src: Path, out: Path, tp: int, ep: int) -> dict:
    # fp32 params: the bf16 checkpoint converts exactly both ways, and logits compare in fp32.
    bridge = AutoBridge.from_hf_pretrained(src, params_dtype=torch.float32)
    model = bridge.to_megatron_model(parallel.Layout(tp=tp, ep=ep))
    with cpu_compat(), torch.no_grad():
        logits = bridge.config.forward_logits(model[0], TOKENS)
    export = out / "hf"
    bridge.save_hf_pretrained(model, export, overwrite=True)
    result: dict = {}
    if parallel.rank() == 0:
        reference = step35_reference(src, TOKENS)
        source, exported = read_tensors(src), read_tensors(export)
        result = {
            "max_abs_diff": (logits.float() - reference).abs().max().item(),
            "missing": sorted(set(source) ^ set(exported)),
            "different": sorted(
                n
                for n in source.keys() & exported.keys()
                if source[n].dtype != exported[n].dtype or not torch.equal(source[n], exported[n])
            ),
            "config_equal": json.loads((src / "config.json").read_text())
            == json.loads((export / "config.json").read_text()),
        }
        (out / "result.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    dist.barrier()
