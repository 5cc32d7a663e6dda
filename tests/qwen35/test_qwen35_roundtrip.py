"""HF -> Megatron -> HF through the core, bit for bit, at TP 1/2 and EP 1/2 (2 gloo processes),
and the Megatron logits at every layout against transformers' reference model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from qwen35_roundtrip_worker import layouts, parity_tokens
from qwen35_testing import VARIANTS, read_tensors, reference_mtp_logits

from bridgecore_qwen35.reference import reference_model

#: fp32 logits (|logits| up to ~4) of two implementations of the same math: transformers' and
#: megatron-core's chunked delta rule, eager vs. Megatron attention, HF vs. Megatron MoE routing.
#: Measured max abs diff: 4e-5 dense, 2.3e-4 MoE.
LOGIT_ATOL = 1e-3

CASES = [(v, tp, ep, "") for v in VARIANTS for tp, ep in layouts(v)]
NATIVE = [(v, *layouts(v)[-1], "-native") for v in VARIANTS]


@pytest.fixture(scope="module")
def converted(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qwen35-out")
    worker = Path(__file__).with_name("qwen35_roundtrip_worker.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        str(worker),
        str(out),
        *(str(p) for p in checkpoints.values()),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=900, start_new_session=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path]) -> dict[str, torch.Tensor]:
    out = {}
    for variant, path in checkpoints.items():
        with torch.no_grad():
            out[variant] = reference_model(path, torch.float32)(input_ids=parity_tokens()).logits
    return out


@pytest.fixture(scope="module")
def mtp_references(checkpoints: dict[str, Path]) -> dict[str, torch.Tensor]:
    return {variant: reference_mtp_logits(path, parity_tokens()) for variant, path in checkpoints.items()}


@pytest.mark.parametrize(("variant", "tp", "ep", "params"), CASES + NATIVE)
def test_roundtrip_is_bit_exact(
    converted: Path, checkpoints: dict[str, Path], variant: str, tp: int, ep: int, params: str
) -> None:
    source = read_tensors(checkpoints[variant])
    exported = read_tensors(converted / f"{variant}-tp{tp}-ep{ep}{params}")
    # Every tensor comes back, the VL vision tower too (kept verbatim as passthrough).
    assert set(exported) == set(source)
    for name in sorted(source):
        assert exported[name].dtype == source[name].dtype, name
        assert torch.equal(exported[name], source[name]), name


@pytest.mark.parametrize(("variant", "tp", "ep", "params"), CASES)
def test_logits_match_transformers(
    converted: Path, references: dict[str, torch.Tensor], variant: str, tp: int, ep: int, params: str
) -> None:
    megatron = torch.load(converted / f"{variant}-tp{tp}-ep{ep}" / "logits.pt")
    assert megatron.dtype == torch.float32 and megatron.shape == references[variant].shape
    torch.testing.assert_close(megatron, references[variant], atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize(("variant", "tp", "ep", "params"), CASES)
def test_mtp_logits_match_the_reference_mtp_head(
    converted: Path, mtp_references: dict[str, torch.Tensor], variant: str, tp: int, ep: int, params: str
) -> None:
    # the last position has no next token to embed: Megatron's MTP rolls a 0 in there
    megatron = torch.load(converted / f"{variant}-tp{tp}-ep{ep}" / "mtp_logits.pt")[:, :-1]
    assert megatron.shape == mtp_references[variant].shape
    torch.testing.assert_close(megatron, mtp_references[variant], atol=LOGIT_ATOL, rtol=0)
