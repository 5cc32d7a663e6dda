"""Shared fixtures: tiny checkpoints written per test."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    from bridgecore_llama_example import write_tiny

    write_tiny(tmp_path / "hf")
    return tmp_path / "hf"
