from __future__ import annotations

from pathlib import Path

import pytest

from bridgecore_step37.tiny import write_tiny


@pytest.fixture(scope="session")
def released_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Step-3.7 checkpoint in the released layout, written once."""
    out = tmp_path_factory.mktemp("step37") / "released"
    write_tiny(out)
    return out


@pytest.fixture(scope="session")
def resaved_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The re-saved layout (`model.language_model.`, `model.vision_model.`), with a projector bias."""
    out = tmp_path_factory.mktemp("step37") / "resaved"
    write_tiny(out, resaved=True, projector_bias=True)
    return out
