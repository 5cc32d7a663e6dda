"""Fixtures of the adapter tests: Megatron adapter checkpoints saved once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from adapter_support import Native, run_worker, write_tiny


@pytest.fixture(scope="session")
def native(tmp_path_factory: pytest.TempPathFactory) -> Native:
    """``native(name, tp, ep, which)``: (HF dir, Megatron adapter checkpoint) of that tiny model, the
    checkpoint saved by ``adapter_worker.py`` (read only by the tests that share it)."""
    made: dict[tuple[str, int, int, str], tuple[Path, Path]] = {}

    def get(name: str, tp: int, ep: int, which: str) -> tuple[Path, Path]:
        key = (name, tp, ep, which)
        if key not in made:
            root = tmp_path_factory.mktemp(f"{name}-tp{tp}-ep{ep}-{which}")
            hf = write_tiny(name, root / "hf")
            run_worker(hf, root / "megatron", tp, ep, which, ranks=max(tp, ep), name=name)
            made[key] = hf, root / "megatron"
        return made[key]

    return get
