"""Shared fixtures: tiny checkpoints written per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# The default run draws the same examples every time, so a property failure in CI is a defect anyone can
# reproduce, never a lucky draw; HYPOTHESIS_PROFILE=explore searches afresh (use it when hunting).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    from bridgecore_llama_example import write_tiny

    write_tiny(tmp_path / "hf")
    return tmp_path / "hf"
