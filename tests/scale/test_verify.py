"""``bridgecore verify`` under torchrun: Megatron logits at TP2 and EP2 against the transformers reference.

The tolerance is relative to the reference's largest |logit|; a layout verify cannot run (PP) and a
failed comparison are one-line CLI errors with exit status 2.
"""

from __future__ import annotations

import pytest
from scale_cli import bridgecore

CASES = [
    ("qwen35-moe", ["--tp", "2"]),
    ("qwen35-moe", ["--ep", "2"]),
    pytest.param("llama-example", ["--tp", "2"], marks=pytest.mark.slow),
    pytest.param("step35", ["--tp", "2"], marks=pytest.mark.slow),
    pytest.param("step35", ["--ep", "2"], marks=pytest.mark.slow),
    pytest.param("qwen35-dense", ["--tp", "2"], marks=pytest.mark.slow),
    pytest.param("step37", ["--ep", "2"], marks=pytest.mark.slow),
]


@pytest.mark.parametrize(
    ("name", "layout"), CASES, ids=lambda v: "".join(v).replace("--", "") if isinstance(v, list) else None
)
def test_verify_at_a_parallel_layout(tiny_checkpoint, name: str, layout: list[str]) -> None:
    done = bridgecore(name, "verify", tiny_checkpoint(name), *layout, ranks=2)
    size = dict(zip(layout[::2], layout[1::2], strict=True))
    assert f"TP={size.get('--tp', '1')} PP=1 EP={size.get('--ep', '1')}" in done.stdout, done.stdout
    assert "tolerance 0.0001; argmax agreement 100.0%" in done.stdout, done.stdout


def test_verify_refuses_pipeline_parallelism_in_one_line(tiny_checkpoint) -> None:
    done = bridgecore("llama-example", "verify", tiny_checkpoint("llama-example"), "--pp", "2", check=False)
    assert done.returncode == 2
    # torch's CUDA build (the megatron-core 0.19 row) warns on stderr that it finds no CUDA runtime
    lines = [line for line in done.stderr.splitlines() if "No CUDA runtime is found" not in line]
    assert len(lines) == 1 and lines[0].startswith(
        "bridgecore: error: verify --pp 2: logits across pipeline stages need"
    )


def test_a_failed_verify_is_a_cli_error(tiny_checkpoint) -> None:
    """A tolerance below fp32 rounding: the same comparison, now a failure, exit status 2."""
    done = bridgecore("qwen35-moe", "verify", tiny_checkpoint("qwen35-moe"), "--rtol", "1e-12", check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "bridgecore: error:" in done.stderr and "above the tolerance 1e-12 (--rtol)" in done.stderr
    assert "Traceback" not in done.stderr
