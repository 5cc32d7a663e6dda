"""Conversion speed and peak memory against the disk limit and against peers, on synthetic checkpoints.

    python3 -m nox -s bench -- --sizes 1 4 --pairs 3 --work /tmp/bench        (its environment: the noxfile)

For each size (GB of bf16 weights) a Llama-layout checkpoint is generated (the example plugin's
layout, scaled by hidden size and layer count) and every command runs as a child process whose
whole process tree is sampled for RSS. Each command alternates with the limit copy (limit, command,
limit, command, ...): one warm-up pair, then ``--pairs`` counted pairs, reported as medians and as
the ratio of each pair. Results go to ``bench/results/`` (markdown table, JSON, PNG).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
PEERS_PYTHON = Path("/tmp/peers/bin/python")
MCORE_BRIDGE = (
    "mcore-bridge 1.6.5 (PyPI) cannot run here: its patcher.py imports TEGroupedLinear/TELinear and its"
    " GPT model is built from Transformer Engine layers, which need CUDA; there is no GPU and no"
    " transformer_engine build for CPU on this machine"
)

LIMIT_COPY = """
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for f in sorted(src.glob("*.safetensors")):
    save_file(load_file(f), dst / f.name, metadata={"format": "pt"})
"""
TRANSFORMERS_COPY = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model.save_pretrained(sys.argv[2], max_shard_size="5GB")
"""


#: the paths that hold the whole model in memory (skipped where it does not fit; budget: model + 2 GB)
WHOLE_MODEL = ("bridgecore import (in memory)", "bridgecore export (in memory)", "peer: transformers")


@dataclass
class Run:
    size_gb: float
    what: str
    seconds: float
    gb_per_s: float
    peak_rss_gb: float
    #: the memory the target counts: anonymous pages (PSS, so forked writers' copy-on-write pages
    #: count once). File pages of the memory-mapped source are in RSS but the kernel reclaims them.
    peak_anon_gb: float
    #: 1-minute load average before the first and after the last counted run: other jobs share the cores.
    load: tuple[float, float]
    #: (limit copy seconds, this command's seconds) of each counted pair; ``seconds`` is the median
    #: of the second, ``ratio`` the median of the per-pair ratios
    pairs: list[tuple[float, float]]
    ratio: float


def llama_config(size_gb: float) -> dict:
    """A Llama config of about ``size_gb`` GB of bf16 weights: width grows with size."""
    hidden = 2048 if size_gb <= 2 else 4096
    inter, vocab, heads, kv = hidden * 4, 32000, hidden // 128, max(1, hidden // 512)
    per_layer = 2 * (hidden * hidden * 2 + 2 * hidden * kv * 128 + 3 * hidden * inter)
    # a multiple of 4 layers, so that every PP size up to 4 splits them
    layers = max(4, 4 * round((size_gb * 1e9 - 4 * vocab * hidden) / per_layer / 4))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": 128,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "dtype": "bfloat16",
    }


def write_checkpoint(out: Path, cfg: dict, shard_bytes: int = 2 * 10**9) -> None:
    """Random-looking bf16 tensors (one random block tiled) in HF shards, written one shard at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # transformers' own names and shapes, no memory
        shapes = {n: tuple(t.shape) for n, t in LlamaForCausalLM(LlamaConfig(**cfg)).state_dict().items()}
    block = (torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    out.mkdir(parents=True)
    groups, size = [[]], 0
    for name, shape in shapes.items():
        n = 2 * torch.Size(shape).numel()
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map, total = {}, 0
    for k, names in enumerate(groups, start=1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for j, name in enumerate(names):
            numel = torch.Size(shapes[name]).numel()
            tensors[name] = block.roll(j).repeat(-(-numel // block.numel()))[:numel].view(shapes[name]).clone()
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def warm(directory: Path) -> None:
    """Read every file once, so the first command timed does not alone pay for a cold page cache."""
    for file in sorted(directory.iterdir()):
        with open(file, "rb", buffering=0) as f:
            while f.read(1 << 26):
                pass


def anon_pss(pid: int) -> int:
    """Bytes of anonymous and shared-memory pages of ``pid``, each shared page split among its sharers."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                total += int(line.split()[1]) * 1024
    return total


def measure(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """Wall seconds, peak RSS and peak anonymous PSS (GB, whole process tree, sampled every 50 ms)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, peak_anon, done = 0, 0, threading.Event()

    def sample() -> None:
        nonlocal peak, peak_anon
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
                peak_anon = max(peak_anon, sum(anon_pss(p.pid) for p in tree))
            except (psutil.Error, OSError):
                pass
            done.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    done.set()
    thread.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{output[-3000:]}")
    return seconds, peak / 1e9, peak_anon / 1e9


def largest_tensor_gb(cfg: dict) -> float:
    return 2 * max(cfg["vocab_size"] * cfg["hidden_size"], cfg["intermediate_size"] * cfg["hidden_size"]) / 1e9


def bench_size(
    size_gb: float, work: Path, layout: list[str], threads: int, pairs: int, only: list[str], procs: int
) -> tuple[list[Run], dict]:
    work.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(size_gb)
    hf = work / f"hf-{size_gb:g}gb"
    if not hf.exists():
        write_checkpoint(hf, cfg)
    data_gb = sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 1e9
    warm(hf)
    env = dict(os.environ, BRIDGECORE_PLUGINS="llama_example")
    bc = [str(BIN / "bridgecore")]
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(procs), "-m", "bridgecore"]
    out = work / f"out-{size_gb:g}gb"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    commands = {
        "physical limit (safetensors read + write)": [sys.executable, "-c", LIMIT_COPY, str(hf), str(out / "copy")],
        "bridgecore import (in memory)": bc + ["import", str(hf), str(out / "mg")],
        "bridgecore export (in memory)": bc + ["export", str(out / "mg"), str(out / "hf-export")],
        f"bridgecore import --offline {' '.join(layout)}": bc
        + ["import", str(hf), str(out / "mg-offline"), "--offline", "--threads", str(threads), *layout],
        "bridgecore export --offline": bc + ["export", str(out / "mg-offline"), str(out / "hf-offline"), "--offline"],
        f"bridgecore import --offline {' '.join(layout)}, {procs} processes": torchrun
        + ["import", str(hf), str(out / "mg-offline-n"), "--offline", "--threads", str(threads), *layout],
        f"bridgecore export --offline, {procs} processes": torchrun
        + ["export", str(out / "mg-offline-n"), str(out / "hf-offline-n"), "--offline"],
        "peer: transformers from_pretrained + save_pretrained": [
            sys.executable,
            "-c",
            TRANSFORMERS_COPY,
            str(hf),
            str(out / "hf-transformers"),
        ],
    }
    outputs = {
        "bridgecore import (in memory)": out / "mg",
        "bridgecore export (in memory)": out / "hf-export",
        f"bridgecore import --offline {' '.join(layout)}": out / "mg-offline",
        "bridgecore export --offline": out / "hf-offline",
        f"bridgecore import --offline {' '.join(layout)}, {procs} processes": out / "mg-offline-n",
        f"bridgecore export --offline, {procs} processes": out / "hf-offline-n",
        "peer: transformers from_pretrained + save_pretrained": out / "hf-transformers",
    }
    # Paths that hold the whole model need about twice its size; at sizes this machine cannot hold
    # they are skipped and reported, not run into the OOM killer.
    fits = 2 * data_gb + 2 < psutil.virtual_memory().available / 1e9
    skipped = [] if fits else [w for w in commands if w.startswith(WHOLE_MODEL)]
    limit_what = next(iter(commands))
    limit_command = commands.pop(limit_what)
    if only:
        commands = {what: c for what, c in commands.items() if any(o in what for o in only)}
    # Each export row reads the output of the import row before it; once the export is compared with
    # the source, both are deleted, so the disk holds at most the source, one import and one export.
    reads = {
        "bridgecore export (in memory)": out / "mg",
        "bridgecore export --offline": out / "mg-offline",
        f"bridgecore export --offline, {procs} processes": out / "mg-offline-n",
    }
    from bridgecore.compare import compare_checkpoints

    runs, limits, exact = [], [], []
    for what, command in commands.items():
        if what in skipped:
            print(f"  {size_gb:g} GB  {what:58s} skipped: holds the whole model, which this machine's RAM cannot")
            continue
        target = outputs[what]
        timed, peak, anon, before = [], 0.0, 0.0, os.getloadavg()[0]
        for pair in range(pairs + 1):  # pair 0 warms up
            shutil.rmtree(out / "copy", ignore_errors=True)
            limit = measure(limit_command, env)
            shutil.rmtree(out / "copy", ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
            seconds, p, a = measure(command, env)
            peak, anon = max(peak, p), max(anon, a)
            if pair:
                timed.append((limit[0], seconds))
                limits.append(limit)
            print(
                f"  {size_gb:g} GB  {what:58s} pair {pair}{' (warm-up)' if not pair else ''}: limit {limit[0]:6.1f} s,"
                f" this {seconds:6.1f} s = {seconds / limit[0]:.2f}x  load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        median = statistics.median(s for _, s in timed)
        ratio = statistics.median(s / lim for lim, s in timed)
        load = (before, os.getloadavg()[0])
        runs.append(Run(size_gb, what, median, data_gb / median, peak, anon, load, timed, ratio))
        if what in reads:
            exact.append(compare_checkpoints(hf, target).exact)
            shutil.rmtree(target)
            shutil.rmtree(reads[what])
    limit_median = statistics.median(lim[0] for lim in limits)
    runs.insert(
        0,
        Run(
            size_gb,
            limit_what,
            limit_median,
            data_gb / limit_median,
            max(lim[1] for lim in limits),
            max(lim[2] for lim in limits),
            (runs[0].load[0], runs[-1].load[1]),
            [(lim[0], lim[0]) for lim in limits],
            1.0,
        ),
    )
    shutil.rmtree(out)
    info = {
        "size_gb": size_gb,
        "data_gb": data_gb,
        "layers": cfg["num_hidden_layers"],
        "hidden": cfg["hidden_size"],
        "largest_tensor_gb": largest_tensor_gb(cfg),
        "bit_exact": all(exact) if exact else None,
        "skipped": skipped,
    }
    return runs, info


def verdicts(runs: list[Run], info: dict) -> list[str]:
    ours = [r for r in runs if r.what.startswith("bridgecore")]
    peers = [r for r in runs if r.what.startswith("peer")]
    lines = []
    for r in ours:
        each = ", ".join(f"{s / lim:.2f}" for lim, s in r.pairs)
        lines.append(
            f"{'PASS' if r.ratio <= 1.5 else 'MISS'} throughput {r.what}: median {r.ratio:.2f}x the limit's time"
            f" over {len(r.pairs)} alternated pairs ({each}; target <= 1.5x)"
        )
        # the in-memory paths hold the model by design: their budget is the model + 2 GB; a streaming
        # path's is 2 GB + 2 x the largest tensor
        if r.what.startswith(WHOLE_MODEL):
            budget, rule = info["data_gb"] + 2, "the model + 2 GB"
        else:
            budget, rule = 2 + 2 * info["largest_tensor_gb"], "2 GB + 2 x largest tensor"
        lines.append(
            f"{'PASS' if r.peak_anon_gb <= budget else 'MISS'} peak memory {r.what}: {r.peak_anon_gb:.2f} GB anonymous"
            f" ({r.peak_rss_gb:.2f} GB RSS with file pages; target <= {budget:.2f} GB = {rule})"
        )
        for p in peers:
            verdict = "PASS" if r.seconds < p.seconds else "MISS"
            lines.append(f"{verdict} faster than {p.what}: {r.seconds:.1f} s vs {p.seconds:.1f} s")
    # the offline paths across processes against one process: throughput per process, and the speed-up
    for r in ours:
        one = next((o for o in ours if r.what.startswith(o.what + ",") and "processes" in r.what), None)
        if one is not None:
            procs = int(r.what.rsplit(", ", 1)[1].split()[0])
            speedup, each = one.seconds / r.seconds, r.gb_per_s / procs
            lines.append(
                f"INFO {r.what}: {r.seconds:.1f} s vs {one.seconds:.1f} s in one process, speed-up {speedup:.2f}x;"
                f" {each:.3f} GB/s per process ({one.gb_per_s:.3f} GB/s alone)"
            )
    return lines


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for what in dict.fromkeys(r.what for r in runs):
        points = sorted((r.size_gb, r.peak_anon_gb) for r in runs if r.what == what)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=what)
    ax.set_xlabel("checkpoint size (GB, bf16)")
    ax.set_ylabel("peak anonymous memory (GB, PSS of the process tree)")
    ax.set_title("Peak memory vs model size (Llama layout, CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 4], help="checkpoint sizes in GB (default 1 4)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bridgecore-bench"), help="scratch directory")
    parser.add_argument("--layout", nargs="*", default=["--tp", "2", "--pp", "2"], help="offline import layout flags")
    parser.add_argument("--threads", type=int, default=2, help="offline import writer threads")
    parser.add_argument("--processes", type=int, default=2, help="processes of the torchrun offline rows (default 2)")
    parser.add_argument("--pairs", type=int, default=3, help="counted (limit, command) pairs after a warm-up pair")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only the rows whose name contains TEXT (repeatable; an export row needs its import row)",
    )
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument(
        "--rejudge",
        action="store_true",
        help="run nothing: rewrite the verdicts, results.md and the plot from --results' results.json",
    )
    args = parser.parse_args()
    all_runs, infos = [], []
    if args.rejudge:
        saved = json.loads((args.results / "results.json").read_text())
        for r in saved["runs"]:
            all_runs.append(Run(**{**r, "load": tuple(r["load"]), "pairs": [tuple(p) for p in r["pairs"]]}))
        infos = saved["checkpoints"]
    for size in [] if args.rejudge else args.sizes:
        runs, info = bench_size(size, args.work, args.layout, args.threads, args.pairs, args.only, args.processes)
        all_runs += runs
        infos.append(info)
    lines = [
        f"[{info['size_gb']:g} GB] {line}"
        for info in infos
        for line in verdicts([r for r in all_runs if r.size_gb == info["size_gb"]], info)
    ]
    print("\n".join(lines))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(
        json.dumps(
            {
                "runs": [asdict(r) for r in all_runs],
                "checkpoints": infos,
                "mcore_bridge": MCORE_BRIDGE,
                "verdicts": lines,
            },
            indent=1,
        )
    )
    table = [
        "| size (GB) | what | wall median (s) | GB/s | x limit (median of pairs) | per-pair ratios"
        " | peak anon (GB) | peak RSS (GB) | load before/after |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    table += [
        f"| {r.size_gb:g} | {r.what} | {r.seconds:.1f} | {r.gb_per_s:.3f} | {r.ratio:.2f}"
        f" | {', '.join(f'{s / lim:.2f}' for lim, s in r.pairs)} | {r.peak_anon_gb:.2f} | {r.peak_rss_gb:.2f}"
        f" | {r.load[0]:.1f} / {r.load[1]:.1f} |"
        for r in all_runs
    ]
    table += [
        f"| {i['size_gb']:g} | {w} | skipped (RAM) | - | - | - | - | - | - |" for i in infos for w in i["skipped"]
    ]
    table += [
        "| - | peer: mcore-bridge | not run | - | - | - | - | - | - |",
        "",
        f"mcore-bridge: {MCORE_BRIDGE}.",
        "",
        "Checkpoints: "
        + "; ".join(
            f"{i['size_gb']:g} GB = {i['layers']} layers of hidden {i['hidden']}, largest tensor"
            f" {i['largest_tensor_gb']:.2f} GB, round trips bit-exact: {i['bit_exact']}"
            for i in infos
        ),
        "",
        "```",
        *lines,
        "```",
    ]
    (args.results / "results.md").write_text("\n".join(table) + "\n")
    plot(all_runs, args.results / "peak_rss_vs_size.png")
    print(f"results in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
