"""Fixtures of the multi-rank and offline conversion tests: the installed families' tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
from scale_cli import TINY, bridgecore

from bridgecore.plugins import installed


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: the rest of the layout matrix (several minutes on 2 cores)")


def _tiny(name: str):
    plugin = TINY[name][0]
    plugins = installed()
    if plugin not in plugins.infos:
        reason = plugins.broken.get(plugin, "not installed")
        pytest.skip(f"plugin {plugin} is not importable here: {reason}")
    found = [t for t in plugins.call_owned("tiny_models", plugins.infos[plugin]) if t.name == name]
    if not found:
        pytest.skip(f"plugin {plugin} ships no tiny model {name!r}")
    return found[0]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_checkpoint(name)``: that tiny model's HF directory, written once per session."""
    written: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in written:
            out = tmp_path_factory.mktemp(name) / "hf"
            _tiny(name).write(out)
            written[name] = out
        return written[name]

    return get


@pytest.fixture(scope="session")
def single_rank(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """``single_rank(name)``: the single-rank round trip's output, the reference of every layout.

    It is the source checkpoint itself, except for tensors a model's flags waive (a VL model's
    vision tower), which no layout converts.
    """
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp(f"{name}-1rank") / "hf"
            bridgecore(name, "roundtrip", tiny_checkpoint(name), *TINY[name][1], "--keep", out, check=not TINY[name][1])
            done[name] = out
        return done[name]

    return get
