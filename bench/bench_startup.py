"""Start-up cost of the commands that convert nothing, against ``python -c "import torch"``.

    python bench/bench_startup.py --rounds 5 --work /tmp/bridgecore-startup

Times ``bridgecore --help``, ``bridgecore plugins`` and ``bridgecore inspect`` of the full-size
Step-3.5-Flash checkpoint (its released config.json and its 804 tensors' safetensors header; the
data section is a sparse file, so it takes no disk) in rounds: every round runs each command once,
in a rotated order, after one warm-up round; the table gives medians of wall and CPU (user + system)
seconds. CPU time moves less than wall time on a shared machine, and the import list does not move
at all: one ``python -X importtime`` run per command records whether torch, megatron-core, dynamo and
inductor were imported. The 1-minute load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
WATCHED = ("torch", "megatron.core", "torch._dynamo", "torch._inductor", "transformers")


def write_sparse_step35(out: Path) -> None:
    """The released Step-3.5-Flash config.json and one safetensors file with every tensor's header entry,
    its data section left a hole of the right size."""
    sys.path.insert(0, str(HERE.parent / "tests" / "step35"))
    from step35_testing import RELEASED

    from bridgecore.hf.dtypes import code_of, data_bytes
    from bridgecore.hf.header import encode_header
    from bridgecore_step35.tiny import step35_tensor_shapes

    entries = [(name, code_of(dtype, name), shape) for name, (shape, dtype) in step35_tensor_shapes(RELEASED).items()]
    header = encode_header(entries, {"format": "pt"})
    data = sum(data_bytes(code, shape) for _, code, shape in entries)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model.safetensors", "wb") as f:
        f.write(header)
        f.truncate(len(header) + data)
    (out / "config.json").write_text(json.dumps(RELEASED, indent=2))


def run(command: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + system of the child) seconds of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def imported(command: list[str]) -> tuple[list[str], int]:
    """Which of WATCHED the command imports, and how many modules in all (``python -X importtime``)."""
    done = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True)
    names = {line.split("|")[2].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    names.discard("imported package")
    return [m for m in WATCHED if m in names], len(names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="counted rounds after one warm-up round (default 5)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bridgecore-startup"), help="scratch directory")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    hf = args.work / "step35-flash-sparse"
    if not (hf / "config.json").exists():
        write_sparse_step35(hf)
    bc = ["-m", "bridgecore"]
    commands = {
        'python -c "import torch"': ["-c", "import torch"],
        "bridgecore --help": [*bc, "--help"],
        "bridgecore plugins": [*bc, "plugins"],
        "bridgecore inspect (Step-3.5-Flash, full size)": [*bc, "inspect", str(hf)],
    }
    load_before = os.getloadavg()[0]
    times: dict[str, list[tuple[float, float]]] = {what: [] for what in commands}
    names = list(commands)
    for r in range(args.rounds + 1):
        order = names[r % len(names) :] + names[: r % len(names)]
        for what in order:
            measured = run([sys.executable, *commands[what]])
            if r:  # round 0 warms the page cache and the interpreter's files
                times[what].append(measured)
    load_after = os.getloadavg()[0]
    imports = {what: imported(command) for what, command in commands.items()}
    torch_wall = statistics.median(w for w, _ in times['python -c "import torch"'])
    torch_cpu = statistics.median(c for _, c in times['python -c "import torch"'])
    lines = [
        f"1-minute load average {load_before:.2f} before, {load_after:.2f} after; {args.rounds} rounds after a warm-up",
        "",
        "| command | wall median (s) | CPU median (s) | wall / import torch | imports (of "
        + ", ".join(WATCHED)
        + ") |",
        "|---|---:|---:|---:|---|",
    ]
    for what in commands:
        wall = statistics.median(w for w, _ in times[what])
        cpu = statistics.median(c for _, c in times[what])
        found, count = imports[what]
        shown = f"{', '.join(found) or 'none'} ({count} modules)"
        lines.append(f"| {what} | {wall:.2f} | {cpu:.2f} | {wall / torch_wall:.2f} | {shown} |")
    verdicts = []
    for what in ("bridgecore --help", "bridgecore plugins"):
        found = imports[what][0]
        wall = statistics.median(w for w, _ in times[what])
        cpu = statistics.median(c for _, c in times[what])
        ok = not found and wall < torch_wall / 2
        verdicts.append(
            f"{'PASS' if ok else 'MISS'} {what}: imports {', '.join(found) or 'none of them'}; wall {wall:.2f} s"
            f" vs import torch {torch_wall:.2f} s (target < half; CPU {cpu:.2f} s vs {torch_cpu:.2f} s)"
        )
    for what in names[1:]:
        heavy = [m for m in imports[what][0] if m in ("torch._dynamo", "torch._inductor")]
        verdicts.append(
            f"{'MISS' if heavy else 'PASS'} {what} imports no dynamo/inductor ({', '.join(heavy) or 'none'})"
        )
    lines += ["", "```", *verdicts, "```"]
    print("\n".join(lines))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "startup.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
