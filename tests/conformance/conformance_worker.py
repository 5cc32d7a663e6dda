"""Run the conformance conversions of a list of jobs in one process (one rank, or every rank of a torchrun).

Usage: [torchrun --nproc-per-node N] conformance_worker.py JOBS.json

Each job is a JSON object with ``kind``, ``src`` (an HF checkpoint), ``out`` (a fresh directory) and:
- ``layout`` (kind "memory"): import at ``tp``/``ep`` with fp32 params (bf16 -> fp32 -> bf16 is exact);
  rank 0 saves the Megatron logits of the fixed tokens to ``out/logits.pt``; every rank exports to
  ``out/hf``. With ``reference``, rank 0 also saves the plugin's reference forward (what ``verify``
  runs) to ``out/reference.pt``.
- ``cross``: import at ``tp``/``ep`` in the checkpoint's own dtype and save torch_dist to
  ``out/megatron``; load that at ``to_tp``/``to_ep`` and export to ``out/hf``.
- ``offline`` (one process, before any process group): ``import --offline`` at ``tp``/``ep`` to
  ``out/offline``, the in-memory import (TP1) to ``out/memory``, then ``export --offline`` of both
  (``out/hf-offline``, ``out/hf-offline-of-memory``) and the in-memory export of the offline one
  (``out/hf-memory-of-offline``).
A job that fails writes its one-line error to ``out/error.txt`` and the run goes on with the next.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from hf_models import tokens as fixed_tokens

from bridgecore import AutoBridge
from bridgecore.megatron import parallel
from bridgecore.megatron.compat import cpu_compat
from bridgecore.megatron.parallel import Layout


def memory(job: dict[str, Any], out: Path) -> None:
    bridge = AutoBridge.from_hf_pretrained(job["src"], params_dtype=torch.float32)
    model = bridge.to_megatron_model(Layout(tp=job["tp"], ep=job["ep"]))
    tokens = fixed_tokens(bridge.config.vocab_size)
    with cpu_compat(), torch.no_grad():
        logits = bridge.config.forward_logits(model[0], tokens).float()
    if parallel.rank() == 0:
        torch.save(logits, out / "logits.pt")
        (out / "notes.txt").write_text("".join(f"{n}\n" for n in bridge.notes))
        if job.get("reference"):
            reference = bridge.plugins.call_owned("hf_reference", bridge.plugin, hf_config=bridge.hf_config)
            torch.save(reference(Path(job["src"]), tokens).float(), out / "reference.pt")
    bridge.save_hf_pretrained(model, out / "hf")


def cross(job: dict[str, Any], out: Path) -> None:
    bridge = AutoBridge.from_hf_pretrained(job["src"])
    model = bridge.to_megatron_model(Layout(tp=job["tp"], ep=job["ep"]))
    bridge.save_megatron(model, out / "megatron")
    back = AutoBridge.from_megatron_checkpoint(out / "megatron")
    model = back.to_megatron_model(Layout(tp=job["to_tp"], ep=job["to_ep"]), load_weights=False)
    back.load_megatron(model, out / "megatron")
    back.save_hf_pretrained(model, out / "hf")


def offline(job: dict[str, Any], out: Path) -> None:
    from bridgecore.offline import stream_to_hf, stream_to_megatron

    stream_to_megatron(AutoBridge.from_hf_pretrained(job["src"]), out / "offline", Layout(tp=job["tp"], ep=job["ep"]))
    stream_to_hf(out / "offline", out / "hf-offline")
    bridge = AutoBridge.from_hf_pretrained(job["src"])
    bridge.save_megatron(bridge.to_megatron_model(), out / "memory")
    back = AutoBridge.from_megatron_checkpoint(out / "offline")
    model = back.to_megatron_model(load_weights=False)
    back.load_megatron(model, out / "offline")
    back.save_hf_pretrained(model, out / "hf-memory-of-offline")
    parallel.leave()
    stream_to_hf(out / "memory", out / "hf-offline-of-memory")


def main(jobs_file: Path) -> None:
    warnings.filterwarnings("ignore")
    jobs = json.loads(jobs_file.read_text())
    # the offline paths run without a process group, so before the in-memory ones make one
    for job in sorted(jobs, key=lambda j: j["kind"] != "offline"):
        out = Path(job["out"])
        if parallel.rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
        try:
            {"memory": memory, "cross": cross, "offline": offline}[job["kind"]](job, out)
        except Exception as exc:  # noqa: BLE001 - recorded for the test of this job, which reports it
            if parallel.rank() == 0:
                (out / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            if job["kind"] == "offline":
                parallel.leave()
    parallel.leave()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
