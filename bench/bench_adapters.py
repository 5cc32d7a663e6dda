"""LoRA adapter conversion time on a synthetic base model (no base weight is read).

    python bench/bench_adapters.py --size 1 --rank 16 --work /tmp/bench-adapters

(in an environment with the core and the example plugin, e.g. the bench session's or the dev venv.)

A Llama-layout checkpoint of SIZE GB (bf16, ``bench_convert.llama_config``) and a PEFT adapter of rank
RANK on its seven linears per layer (random A and B, written by ``bridgecore.hf.peft``) are generated;
then, in this process after one warm-up call of each, ``--repeat`` timed calls of ``import_adapter``
(PEFT -> Megatron at TP1 and TP2) and ``export_adapter`` (back), and once each the CLI commands as
child processes (their wall time includes importing torch and megatron-core). Medians are printed as
a markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import llama_config, write_checkpoint  # noqa: E402

from bridgecore import Layout, export_adapter, import_adapter  # noqa: E402
from bridgecore.hf.peft import PeftAdapter, write_peft  # noqa: E402

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def make_adapter(cfg: dict, rank: int, out: Path) -> int:
    hidden, inter, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * 128
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden)}
    shapes |= {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    adapter = PeftAdapter(r=rank, alpha=2 * rank)
    gen = torch.Generator().manual_seed(0)
    for layer in range(cfg["num_hidden_layers"]):
        for block, names in PROJECTIONS.items():
            for name in names:
                rows, cols = shapes[name]
                module = f"model.layers.{layer}.{block}.{name}"
                adapter.a[module] = torch.randn(rank, cols, generator=gen).bfloat16()
                adapter.b[module] = torch.randn(rows, rank, generator=gen).bfloat16()
    write_peft(out, adapter)
    return sum(t.nbytes for t in (*adapter.a.values(), *adapter.b.values()))


def timed(fn, repeat: int) -> float:  # noqa: ANN001
    fn()  # warm-up: first imports, first meta build
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cli(*args: str | Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bridgecore", *map(str, args)], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=1.0, help="base model size in GB of bf16 weights")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-adapters"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    cfg = llama_config(args.size)
    base, peft = args.work / "base", args.work / "peft"
    write_checkpoint(base, cfg)
    nbytes = make_adapter(cfg, args.rank, peft)

    def fresh(path: Path) -> Path:
        shutil.rmtree(path, ignore_errors=True)
        return path

    rows = []
    for layout in (Layout(), Layout(tp=2)):
        out = args.work / f"megatron-tp{layout.tp}"
        seconds = timed(lambda: import_adapter(peft, fresh(out), base, layout), args.repeat)  # noqa: B023
        rows.append((f"import_adapter (TP{layout.tp})", seconds))
    back = args.work / "peft-back"
    seconds = timed(lambda: export_adapter(args.work / "megatron-tp2", fresh(back), base), args.repeat)
    rows.append(("export_adapter (saved at TP2)", seconds))
    rows.append(
        ("`bridgecore import-adapter` (process)", cli("import-adapter", peft, fresh(args.work / "c"), "--base", base))
    )
    rows.append(
        ("`bridgecore export-adapter` (process)", cli("export-adapter", args.work / "c", fresh(back), "--base", base))
    )

    print(
        f"base {args.size:g} GB ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}),"
        f" adapter rank {args.rank}: {nbytes / 1e6:.1f} MB, {7 * cfg['num_hidden_layers']} modules\n"
    )
    print("| step | wall median (s) |\n|---|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
