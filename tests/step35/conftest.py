from __future__ import annotations

from pathlib import Path

import pytest

from bridgecore_step35.tiny import write_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Step-3.5 checkpoint in the released layout (bf16, fp32 router bias), written once."""
    out = tmp_path_factory.mktemp("step35") / "tiny"
    write_tiny(out)
    return out
