"""The conformance checkpoints (written by transformers' own classes), their reference logits, and
a runner for the conversion worker (one process, or several under torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

for needed in ("bridgecore_step35", "bridgecore_step37", "bridgecore_qwen35"):
    pytest.importorskip(needed, reason="the conformance tests need every model plugin")

from hf_models import VARIANTS, tokens  # noqa: E402 (after the plugin check)

WORKER = Path(__file__).with_name("conformance_worker.py")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: the rest of the conformance layout matrix")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every variant's checkpoint, and beside it ``<name>.logits.pt``: the writing model's fp32 logits."""
    root = tmp_path_factory.mktemp("conformance")
    for variant in VARIANTS:
        model = variant.build(root / variant.name)
        with torch.no_grad():
            logits = model(input_ids=tokens(model.config.get_text_config().vocab_size)).logits.float()
        torch.save(logits, root / f"{variant.name}.logits.pt")
    return {v.name: root / v.name for v in VARIANTS}


@pytest.fixture(scope="session")
def run_jobs() -> Callable[[list[dict[str, Any]], int], None]:
    """``run_jobs(jobs, ranks)``: the worker over ``jobs`` in one process, or ``ranks`` under torchrun."""

    def run(jobs: list[dict[str, Any]], ranks: int) -> None:
        jobs_file = Path(jobs[0]["out"]).parent / "jobs.json"
        jobs_file.parent.mkdir(parents=True, exist_ok=True)
        jobs_file.write_text(json.dumps(jobs, default=str))
        launcher = [sys.executable]
        if ranks > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        done = subprocess.run(
            [*launcher, str(WORKER), str(jobs_file)],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
            start_new_session=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-4000:]

    return run
