"""Outputs are atomic: a killed or disk-full run leaves the previous output intact or nothing at the
target, never something that looks complete; existing output needs --overwrite."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from reliability_support import Result, cli_process, run_process, siblings

from bridgecore.compare import compare_checkpoints

Cli = Callable[..., Result]

# Fault injection for the kill tests: the real CLI, with each tensor write (export) or the torch_dist
# save (import) slowed so that the kill lands while the temporary directory is being filled.
SLOW_EXPORT = """
import time
from bridgecore.hf import writer
_write = writer.ShardedWriter.write
writer.ShardedWriter.write = lambda self, *a, **k: (time.sleep(0.3), _write(self, *a, **k))[1]
"""
SLOW_IMPORT = """
import time
from megatron.core import dist_checkpointing
_save = dist_checkpointing.save
dist_checkpointing.save = lambda *a, **k: (time.sleep(0.5), _save(*a, **k), time.sleep(30))[1]
"""

# Fault injection for the final swap: SIGKILL the run right before or right after the step that
# puts the new output in place of the old one (an exchange, or two renames where the file system has none).
KILL_AT_SWAP = """
import os, signal
from pathlib import Path
from bridgecore.hf import writer
WHEN, EXCHANGE = {when!r}, {exchange!r}
_exchange = writer._exchange
def swap(a, b):
    if WHEN == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    done = _exchange(a, b) if EXCHANGE else False
    if WHEN == "after" and done:
        os.kill(os.getpid(), signal.SIGKILL)
    return done
writer._exchange = swap
_rename = Path.rename
def rename(self, target):
    moved = _rename(self, target)
    if WHEN == "after" and ".old-" in Path(target).name:  # the old output moved aside, the new not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    return moved
Path.rename = rename
"""


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def megatron_dir(cli: Cli, llama_dir: Path, tmp_path: Path) -> Path:
    assert cli("import", llama_dir, tmp_path / "megatron").returncode == 0
    return tmp_path / "megatron"


def kill_when_temp_appears(proc: subprocess.Popen, target: Path, timeout: float = 240) -> None:
    """SIGKILL `proc` and its process group once its temporary sibling of `target` exists (the run is then
    mid-write), as a scheduler or Ctrl-C stops a job: megatron-core 0.19 saves through a spawned worker
    that would otherwise outlive the run, holding the output pipes open."""
    deadline = time.monotonic() + timeout
    while not list(target.parent.glob(f".{target.name}.tmp-*")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never started writing"
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("previous", [False, True], ids=["new-target", "overwrite"])
def test_killed_export_leaves_previous_output_or_nothing(
    cli: Cli, llama_dir: Path, megatron_dir: Path, tmp_path: Path, previous: bool
) -> None:
    out = tmp_path / "out"
    if previous:
        assert cli("export", megatron_dir, out).returncode == 0
        (out / "marker.txt").write_text("previous output")
    before = snapshot(out) if previous else None
    proc = cli_process("export", megatron_dir, out, "--overwrite", prelude=SLOW_EXPORT, start_new_session=True)
    kill_when_temp_appears(proc, out)
    if previous:
        assert snapshot(out) == before
    else:
        assert not out.exists()
    # The killed run's hidden temporary stays behind, and the next run names it but is not disturbed by it.
    (temp,) = [name for name in siblings(out) if name.startswith(".out.tmp-")]
    rerun = cli("export", megatron_dir, out, "--overwrite")
    assert rerun.returncode == 0 and f"holds {temp}, left by interrupted runs" in rerun.stdout, rerun.stdout
    assert compare_checkpoints(llama_dir, out).exact and not (out / "marker.txt").exists()
    assert temp in siblings(out)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_killed_during_the_final_swap(
    cli: Cli, llama_dir: Path, megatron_dir: Path, tmp_path: Path, when: str, exchange: bool
) -> None:
    """A kill as the new output replaces the old one: with the exchange the target holds the old or the
    new output, whole; with two renames the old output waits beside it, whole, and the next run names it."""
    out = tmp_path / "out"
    assert cli("export", megatron_dir, out).returncode == 0
    (out / "marker.txt").write_text("previous output")
    before = snapshot(out)
    prelude = KILL_AT_SWAP.format(when=when, exchange=exchange)
    proc = cli_process("export", megatron_dir, out, "--overwrite", prelude=prelude)
    proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    left = [name for name in siblings(out) if name != "out"]
    if when == "before":
        (temp,) = left
        assert snapshot(out) == before and temp.startswith(".out.tmp-")
    elif exchange:
        # the new output is in place; the old one, in the temporary's place, was not yet removed
        (temp,) = left
        assert compare_checkpoints(llama_dir, out).exact and not (out / "marker.txt").exists()
        assert snapshot(tmp_path / temp) == before
    else:
        # the one window two renames leave: both outputs whole, beside the target
        old, new = left
        assert not out.exists() and old.startswith(".out.old-") and snapshot(tmp_path / old) == before
        assert new.startswith(".out.tmp-") and compare_checkpoints(llama_dir, tmp_path / new).exact
    rerun = cli("export", megatron_dir, out, "--overwrite")
    assert rerun.returncode == 0 and f"holds {', '.join(left)}, left by interrupted runs" in rerun.stdout, rerun.stdout


def test_killed_import_leaves_nothing(megatron_dir: Path, llama_dir: Path, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "imported"
    proc = cli_process("import", llama_dir, out, prelude=SLOW_IMPORT, start_new_session=True)
    kill_when_temp_appears(proc, out)
    assert not out.exists()
    assert cli("import", llama_dir, out).returncode == 0 and (out / "release" / ".metadata").is_file()


@pytest.mark.parametrize("command", ["import", "export", "roundtrip"])
def test_existing_output_is_refused_without_overwrite(
    cli: Cli, llama_dir: Path, megatron_dir: Path, tmp_path: Path, command: str
) -> None:
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = {"import": (llama_dir, out), "export": (megatron_dir, out), "roundtrip": (llama_dir, "--keep", out)}[command]
    line = cli(command, *args).error_line()
    assert f"{out}: already exists" in line and "overwrite" in line
    assert snapshot(out) == {"keep.txt": b"mine"} and siblings(out) == ["existing"]


def test_overwrite_replaces_only_with_a_complete_output(
    cli: Cli, llama_dir: Path, megatron_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert cli("roundtrip", llama_dir, "--keep", out, "--overwrite").returncode == 0
    assert compare_checkpoints(llama_dir, out).exact and not (out / "stale.txt").exists() and siblings(out) == ["out"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 300 KiB tmpfs: room for one tiny export (183 kB) but not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], check=False, capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the RLIMIT_FSIZE test covers disk-full"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_export_keeps_the_previous_output(cli: Cli, megatron_dir: Path, small_disk: Path) -> None:
    out = small_disk / "out"
    assert cli("export", megatron_dir, out).returncode == 0
    before = snapshot(out)
    line = cli("export", megatron_dir, out, "--overwrite").error_line()
    assert "No space left on device while writing" in line and "the output path was left as it was" in line
    assert snapshot(out) == before and siblings(out) == ["out"]


def test_disk_full_import_leaves_nothing(cli: Cli, llama_dir: Path, small_disk: Path) -> None:
    (small_disk / "ballast").write_bytes(b"\0" * 200_000)
    out = small_disk / "megatron"
    line = cli("import", llama_dir, out).error_line()
    assert f"{out}: writing the torch_dist checkpoint failed" in line and "bytes free on that disk" in line
    assert siblings(out) == []


def test_file_size_limit_export_fails_cleanly(megatron_dir: Path, tmp_path: Path) -> None:
    """Disk-full without privileges: RLIMIT_FSIZE makes writes past 100 kB fail (EFBIG) in the child."""
    out = tmp_path / "out"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    line = run_process("export", megatron_dir, out, preexec_fn=limit).error_line()
    assert "File too large while writing" in line and str(out) in line
    assert siblings(out) == []
