"""Fixtures of the interoperability tests: tiny HF checkpoints and the training checkpoints saved from them."""

from __future__ import annotations

from pathlib import Path

import pytest
from interop_support import save_in_process, write_tiny
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: the rest of the layout matrix (several minutes on 2 cores)")


def _double(hf: Path) -> None:
    """Every tensor of the checkpoint in ``hf`` doubled (exact in any float dtype): the same model at
    another point of its training."""
    for file in hf.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            metadata = f.metadata()
        save_file({k: v * 2 for k, v in load_file(file).items()}, file, metadata=metadata)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_hf(name)``: that tiny model's HF directory, written once per session."""
    written: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in written:
            base = name.removesuffix("-doubled")
            written[name] = write_tiny(base, tmp_path_factory.mktemp(name) / "hf")
            if name != base:
                _double(written[name])
        return written[name]

    return get


@pytest.fixture(scope="session")
def llama_trained(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama's training checkpoint with iterations 100 and 200 (the tracker names 200);
    iteration 100 holds the weights of ``tiny_hf("llama-example-doubled")``, 200 those of the tiny."""
    out = tmp_path_factory.mktemp("llama-trained") / "run"
    save_in_process(tiny_hf("llama-example-doubled"), out, 100)
    return save_in_process(tiny_hf("llama-example"), out, 200)


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """The CLI leaves its process group on success only (a failed run ends its process); tests calling
    ``bridgecore.cli.main`` in this process leave it after every test, so the offline paths can run."""
    yield
    from bridgecore.megatron import parallel

    parallel.leave()
