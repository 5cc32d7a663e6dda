"""Shared fixtures: tiny checkpoints written per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import Phase, settings

# The default run draws the same examples every time, so a property failure in CI is a defect anyone can
# reproduce, never a lucky draw; HYPOTHESIS_PROFILE=explore searches afresh (use it when hunting).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
# `nox -s mutants`: a mutant a property test catches fails at once; shrinking its example (seconds to
# minutes each, for hundreds of mutants) would only make the report prettier.
settings.register_profile("mutants", derandomize=True, database=None, phases=[Phase.explicit, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: the rest of the layout matrix (deselected by default)")


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    from bridgecore.testing import write_tiny

    return write_tiny("llama_example", "llama-example", tmp_path / "hf")
