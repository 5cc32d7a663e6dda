"""No command can hang: a writer that fails, or a rank that dies mid-save, ends the run with one
`bridgecore: error:` line within a bounded time and leaves nothing at the output path."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from reliability_support import EXAMPLE, Result, run_process, siblings

Cli = Callable[..., Result]

#: each torch_dist file is written by a writer thread of the import's own process through this function.
WRITE_ITEM = "torch.distributed.checkpoint.filesystem._write_item"

# The torchrun ranks: rank 1 is SIGKILLed by its writer, as the OOM killer would stop it, mid-save.
RANK_DIES = """
import os, signal
from torch.distributed.checkpoint import filesystem
_write = filesystem._write_item
def dying(*args, **kwargs):
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return _write(*args, **kwargs)
filesystem._write_item = dying
from bridgecore.cli import main
raise SystemExit(main())
"""


def test_writer_that_raises_fails_in_one_line(
    cli: Cli, llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected writer failure")

    monkeypatch.setattr(WRITE_ITEM, failing)
    out = tmp_path / "out"
    start = time.monotonic()
    line = cli("import", llama_dir, out).error_line()
    assert time.monotonic() - start < 60
    assert f"{out}: writing the torch_dist checkpoint failed" in line and "injected writer failure" in line
    assert siblings(out) == []


def test_import_without_psutil_finishes(llama_dir: Path, tmp_path: Path) -> None:
    """megatron-core's forked writers call psutil, which nothing declares; they died and the save waited forever."""
    out = tmp_path / "out"
    try:
        done = run_process("import", llama_dir, out, prelude="import sys\nsys.modules['psutil'] = None", timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("import without psutil hung")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "release" / ".metadata").is_file() and siblings(out) == ["out"]


def test_rank_killed_mid_save_ends_every_rank_in_one_line(llama_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "rank_dies.py"
    script.write_text(RANK_DIES)
    out = tmp_path / "out"
    env = dict(os.environ, BRIDGECORE_PLUGINS=EXAMPLE, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    try:
        done = subprocess.run(
            [*command, str(script), "import", str(llama_dir), str(out), "--tp", "2"],
            capture_output=True,
            text=True,
            env=env,
            timeout=240,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the surviving rank hung after its peer was killed")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("bridgecore: error:")]
    assert len(errors) == 1 and errors[0].startswith("bridgecore: error: rank 0:"), done.stderr[-3000:]
    # rank 0 sees its collective fail ("another rank died"), or torchrun stops it first ("another rank failed")
    assert "another rank died" in errors[0] or "stopped by SIGTERM (under torchrun: another rank failed" in errors[0]
    left = sorted(
        str(p.relative_to(tmp_path)) for s in siblings(out) for p in [tmp_path / s, *(tmp_path / s).rglob("*")]
    )
    assert left == [], (left, done.stderr[-3000:])
