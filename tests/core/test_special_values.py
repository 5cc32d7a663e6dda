"""NaN (with sign and payload), infinities, -0 and subnormals pass every conversion path bit for bit.

A checkpoint may hold them (a diverged run, a masked row, a value flushed by hand); a converter must
carry them as they are, never canonicalise a NaN or turn -0 into 0. The tiny Llama (bfloat16) gets
such values in a replicated norm, the vocab-split embedding, a column-split fused q/k/v and a
row-split projection; each path below must give it back bit-identical.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bridgecore.compare import compare_checkpoints
from bridgecore.testing import write_tiny
from bridgecore.tiny import write_checkpoint

sys.path.insert(0, str(Path(__file__).parents[1]))
from cli_runner import run_cli

PLUGINS = "llama_example"
#: bfloat16 bit patterns: quiet NaN with a payload, negative NaN, signalling-style NaN, +-Inf, -0,
#: the smallest subnormal and its negative.
SPECIAL = torch.tensor([0x7FC1, 0xFFC3, 0x7F81, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x8001]).to(torch.int16)
TENSORS = (
    "model.norm.weight",
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.1.self_attn.o_proj.weight",
)


def _with_special_values(tensors: dict[str, torch.Tensor]) -> None:
    values = SPECIAL.view(torch.bfloat16)
    for i, name in enumerate(TENSORS):
        flat = tensors[name].view(-1)
        assert flat.dtype == torch.bfloat16, name
        # spread over the tensor, so every TP rank's shard holds some
        at = torch.linspace(i, flat.numel() - 1 - i, len(values)).long()
        flat[at] = values


def _load(hf: Path) -> dict[str, torch.Tensor]:
    return {k: v for file in sorted(hf.glob("*.safetensors")) for k, v in load_file(file).items()}


@pytest.fixture(scope="module")
def special_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = write_tiny("llama_example", "llama-example", tmp_path_factory.mktemp("special") / "hf")
    tensors = _load(out)
    _with_special_values(tensors)
    config = json.loads((out / "config.json").read_text())
    for file in out.glob("model*.safetensors*"):
        file.unlink()
    write_checkpoint(out, config, tensors, shards=2)
    return out


PATHS = {
    "in-memory": [["roundtrip", "{hf}", "--keep", "{out}"]],
    "in-memory-fp32-params": [["roundtrip", "{hf}", "--params-dtype", "float32", "--keep", "{out}"]],
    "offline-tp2": [
        ["import", "{hf}", "{mid}", "--offline", "--tp", "2"],
        ["export", "{mid}", "{out}", "--offline"],
    ],
}


@pytest.mark.parametrize("path", PATHS)
def test_special_values_pass_bit_for_bit(special_hf: Path, tmp_path: Path, path: str) -> None:
    names = {"hf": special_hf, "mid": tmp_path / "megatron", "out": tmp_path / "out"}
    for args in PATHS[path]:
        done = run_cli(*(a.format(**names) for a in args), plugins=PLUGINS)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = compare_checkpoints(special_hf, tmp_path / "out")
    assert result.exact, result


def test_special_values_pass_tp2_in_memory(special_hf: Path, tmp_path: Path) -> None:
    """At TP 2 the shards are gathered over the process group; the values must survive the collective."""
    done = run_cli("roundtrip", str(special_hf), "--tp", "2", "--keep", str(tmp_path / "out"), nproc=2, plugins=PLUGINS)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert compare_checkpoints(special_hf, tmp_path / "out").exact


def test_the_fixture_holds_the_special_values(special_hf: Path) -> None:
    """The check above is only as good as its input: every pattern is in every tensor named."""
    tensors = _load(special_hf)
    for name in TENSORS:
        assert set(SPECIAL.tolist()) <= set(tensors[name].view(torch.int16).view(-1).tolist()), name
