"""Helpers of the interoperability tests: tiny HF checkpoints and the Megatron-LM training checkpoints
saved from them (``megatron_lm.py``, under torchrun or in this process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridgecore.plugins import installed

HERE = Path(__file__).parent
#: tiny model -> the plugin that converts it
PLUGIN = {
    "llama-example": "llama_example",
    "step35": "step35",
    "step37": "step37",
    "qwen35-dense": "qwen35",
    "qwen35-moe": "qwen35",
}


def env(name: str) -> dict[str, str]:
    return dict(os.environ, BRIDGECORE_PLUGINS=PLUGIN[name], OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def write_tiny(name: str, out: Path) -> Path:
    plugins = installed()
    info = plugins.infos.get(PLUGIN[name])
    if info is None:
        pytest.skip(f"plugin {PLUGIN[name]} is not installed here")
    tiny = [t for t in plugins.call_owned("tiny_models", info) if t.name == name]
    tiny[0].write(out)
    return out


def save_training(name: str, hf: Path, out: Path, ranks: int, *flags: str) -> Path:
    """``megatron_lm.py`` under torchrun: a Megatron-LM training checkpoint of ``hf`` in ``out``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    command += [str(HERE / "megatron_lm.py"), str(hf), str(out), *flags]
    done = subprocess.run(command, env=env(name), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"saving the training checkpoint failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out


def save_in_process(hf: Path, out: Path, iteration: int, **options: object) -> Path:
    """``megatron_lm.save_training_checkpoint`` at one rank in this process (no torchrun start-up)."""
    from megatron_lm import save_training_checkpoint

    from bridgecore.megatron import parallel

    try:
        save_training_checkpoint(hf, out, iteration, parallel.Layout(), **options)
    finally:
        parallel.leave()
    return out
