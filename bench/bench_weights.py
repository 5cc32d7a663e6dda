"""Weight streaming for RL: ``AutoBridge.export_hf_weights`` against a plain memcpy of the same bytes.

    python bench/bench_weights.py --size 4 --rounds 3                                # TP1
    torchrun --nproc-per-node 2 bench/bench_weights.py --size 4 --tp 2 --rounds 3    # TP2, gloo on CPU

The model (the bench's synthetic Llama checkpoint of ``--size`` GB, bf16) is built once in memory at
the given TP. Each round, after one warm-up round, runs every mode once, in a rotated order:

| mode | what it does |
|---|---|
| memcpy | as many bytes as the export yields, from the model's params into a kept buffer of the bucket size |
| pairs | iterates ``export_hf_weights(model)``: the (name, tensor) pairs, gathered over TP |
| buckets | ``export_hf_weights(model, bucket_size=..., device="cpu")``: a new flat buffer per bucket |
| buckets, kept buffer | the same with ``buffer=`` one staging buffer allocated once, as memcpy's |
| export to disk | ``save_hf_pretrained`` into a scratch directory: the in-memory export |

Rank 0 prints, per mode, the median wall and CPU (this process, all threads) seconds, the median of
the per-round ratios to memcpy, and the 1-minute load average before and after; and a PASS/MISS
against the target (bucketed streaming within 2x of memcpy at TP1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from bench_convert import llama_config, write_checkpoint

from bridgecore import AutoBridge, export_hf_weights
from bridgecore.hf.writer import parse_size
from bridgecore.megatron import parallel
from bridgecore.megatron.parallel import Layout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=4, help="checkpoint size in GB (default 4)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size = torchrun's --nproc-per-node")
    parser.add_argument("--rounds", type=int, default=3, help="counted rounds after one warm-up round (default 3)")
    parser.add_argument("--bucket-size", default="2GB", help="bucket cap (default 2GB, as mbridge's)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bridgecore-bench"), help="scratch directory")
    args = parser.parse_args()
    parallel.init_distributed()
    rank = dist.get_rank()
    hf = args.work / f"hf-{args.size:g}gb"
    if rank == 0 and not hf.exists():
        write_checkpoint(hf, llama_config(args.size))
    dist.barrier()
    bridge = AutoBridge.from_hf_pretrained(hf, plugin="llama_example")
    model = bridge.to_megatron_model(Layout(tp=args.tp))
    total = sum(t.numel() * t.element_size() for _, t in export_hf_weights(bridge, model))
    cap = parse_size(args.bucket_size)
    params = [p.detach().reshape(-1).view(torch.uint8) for chunk in model for p in chunk.parameters()]
    staging = torch.zeros(cap, dtype=torch.uint8)

    def memcpy() -> None:
        left, i, used = total, 0, 0
        while left:
            src = params[i % len(params)][: min(left, cap)]
            if used + src.numel() > cap:
                used = 0
            staging[used : used + src.numel()].copy_(src)
            used += src.numel()
            left -= src.numel()
            i += 1

    def pairs() -> None:
        for _ in export_hf_weights(bridge, model):
            pass

    kept = torch.zeros(cap, dtype=torch.uint8)

    def bucketed(buffer: torch.Tensor | None) -> Callable[[], None]:
        def run() -> None:
            for _ in export_hf_weights(bridge, model, bucket_size=cap, device="cpu", buffer=buffer):
                pass

        return run

    def to_disk() -> None:
        out = args.work / "weights-export"
        if rank == 0:
            shutil.rmtree(out, ignore_errors=True)
        dist.barrier()
        bridge.save_hf_pretrained(model, out)

    modes = {
        "memcpy": memcpy,
        "pairs": pairs,
        f"buckets {args.bucket_size}": bucketed(None),
        f"buckets {args.bucket_size}, kept buffer": bucketed(kept),
        "export to disk (save_hf_pretrained)": to_disk,
    }
    names = list(modes)
    load_before = os.getloadavg()[0]
    timings: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(args.rounds + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            dist.barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            modes[name]()
            dist.barrier()
            if r:
                timings[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    load_after = os.getloadavg()[0]
    if rank == 0:
        shutil.rmtree(args.work / "weights-export", ignore_errors=True)
        report(args, total, timings, (load_before, load_after))
    parallel.leave()
    return 0


def report(args: argparse.Namespace, total: int, timings: dict[str, list[tuple[float, float]]], load: tuple) -> None:
    copies = timings["memcpy"]
    print(
        f"TP{args.tp}, {total / 1e9:.2f} GB exported per rank, {args.rounds} rounds after a warm-up;"
        f" 1-minute load average {load[0]:.2f} before, {load[1]:.2f} after"
    )
    print("| mode | wall median (s) | CPU median (s) | GB/s | median per-round ratio to memcpy (wall) |")
    print("|---|---:|---:|---:|---:|")
    ratios = {}
    for name, runs in timings.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        ratios[name] = statistics.median(w / c for (w, _), (c, _) in zip(runs, copies, strict=True))
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {total / 1e9 / wall:.2f} | {ratios[name]:.2f} |")
    if args.tp == 1:
        for name in timings:
            if name.startswith("buckets"):
                verdict = "PASS" if ratios[name] <= 2 else "MISS"
                print(f"{verdict} {name} at TP1: {ratios[name]:.2f}x memcpy's time (target <= 2x)")


if __name__ == "__main__":
    sys.exit(main())
