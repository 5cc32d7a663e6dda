"""Importing an FP8 block-scaled release against importing the same model unquantized.

    python bench/bench_fp8.py --size 1 --pairs 3 --work /tmp/bench-fp8

(in an environment with the core, the example plugin and the quant plugin, e.g. the dev venv.)

A Llama-layout checkpoint of SIZE GB (bf16, ``bench_convert.llama_config``) is generated, and its FP8
release: every linear's weight in E4M3 with float32 scales per 128x128 block (``quantization_config``
as DeepSeek-V3 / Qwen3.5-FP8 write it; quantized by the quant plugin's ``fp8_block_quantize``). Then
``bridgecore import --offline`` (TP1, and the given layout) of each runs as a child process, in
alternating pairs after a warm-up pair, with the load average printed beside each figure. The target
(issue 25) is the FP8 import within 1.5x the unquantized one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import llama_config, write_checkpoint  # noqa: E402

from bridgecore_quant.numerics import fp8_block_quantize  # noqa: E402

BLOCK = (128, 128)


def make_release(base: Path, out: Path) -> None:
    """``base`` with its linears in FP8 blocks, shard by shard (one shard in memory at a time)."""
    out.mkdir(parents=True)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    weight_map = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors = {}
        for name, value in load_file(base / file).items():
            if name.endswith("_proj.weight"):
                codes, scales = fp8_block_quantize(value, None, BLOCK, torch.float32)
                tensors[name], tensors[name.removesuffix("weight") + "weight_scale_inv"] = codes, scales
            else:
                tensors[name] = value
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))


def timed_import(src: Path, out: Path, layout: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "bridgecore", "import", str(src), str(out), "--offline", *layout],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=1.0, help="model size in GB of bf16 weights")
    parser.add_argument("--pairs", type=int, default=3, help="counted (bf16, fp8) pairs after a warm-up pair")
    parser.add_argument("--layout", nargs="*", default=["--tp", "2"], help="the second row's layout flags")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-fp8"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    cfg = llama_config(args.size)
    base, release = args.work / "bf16", args.work / "fp8"
    write_checkpoint(base, cfg)
    make_release(base, release)
    sizes = {p: sum(f.stat().st_size for f in p.glob("*.safetensors")) / 1e9 for p in (base, release)}
    print(f"model {args.size:g} GB bf16 ({sizes[base]:.2f} GB on disk), FP8 release {sizes[release]:.2f} GB\n")
    print("| layout | bf16 import (s) | FP8 import (s) | ratio | load |\n|---|---:|---:|---:|---:|")
    for layout in ([], args.layout):
        times: dict[Path, list[float]] = {base: [], release: []}
        for pair in range(args.pairs + 1):
            for src in (base, release):
                seconds = timed_import(src, args.work / "megatron", layout)
                if pair:
                    times[src].append(seconds)
        bf16, fp8 = (statistics.median(times[p]) for p in (base, release))
        load = os.getloadavg()[0]
        print(f"| {' '.join(layout) or 'TP1'} | {bf16:.2f} | {fp8:.2f} | {fp8 / bf16:.2f}x | {load:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
