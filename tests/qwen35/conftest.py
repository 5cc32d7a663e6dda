from __future__ import annotations

from pathlib import Path

import pytest
from qwen35_testing import VARIANTS


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny variant in its released layout, written once."""
    root = tmp_path_factory.mktemp("qwen35")
    for name, write in VARIANTS.items():
        write(root / name)
    return {name: root / name for name in VARIANTS}
