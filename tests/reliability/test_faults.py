"""Fault injection, one class of failure per test, each bounded in time: a source shard that shrinks
while it is read, a full disk (a real tmpfs where one can be mounted, a file size limit everywhere),
SIGTERM and Ctrl-C at several points of a write, a rank that fails while its peer is inside the
save, a symlinked side file, a verify whose logits are not finite and config values of the wrong
kind. Every one ends in one `bridgecore: error:` line that names what failed, and nothing is left
beside the output."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from reliability_support import EXAMPLE, Result, cli_process, edit_config, rewrite, run_process, siblings

Cli = Callable[..., Result]
SHARD2 = "model-00002-of-00002.safetensors"

#: the HF reader's first read of the second shard first cuts that shard to its header.
SHRINKS_WHILE_READ = f"""
import os
from bridgecore.hf import reader
_pread = reader.CheckpointReader._pread
def shrinking(self, name, offset, length):
    path = self.file_of(name)
    if path.name == {SHARD2!r} and not getattr(self, "_cut", False):
        self._cut = True
        with open(path, "r+b") as file:
            file.truncate(offset)
    return _pread(self, name, offset, length)
reader.CheckpointReader._pread = shrinking
"""
#: the shard is cut after every tensor was read, while the import saves params read from it.
SHRINKS_DURING_SAVE = f"""
import os, sys
from bridgecore.megatron import checkpoint
_save = checkpoint.save_dist
def cut_then_save(*args, **kwargs):
    hf = sys.argv[sys.argv.index("import") + 1]
    with open(os.path.join(hf, {SHARD2!r}), "r+b") as file:
        file.truncate(1000)
    return _save(*args, **kwargs)
checkpoint.save_dist = cut_then_save
"""
#: every torch_dist item written takes 0.2 s, so a signal lands inside the write.
SLOW_WRITES = """
import time
from torch.distributed.checkpoint import filesystem
_write = filesystem._write_item
def slow(*args, **kwargs):
    time.sleep(0.2)
    return _write(*args, **kwargs)
filesystem._write_item = slow
"""
#: under torchrun, rank 0 may write no file larger than 300 bytes: it fails on megatron-core's
#: common state while rank 1 is already inside the sharded save.
RANK0_DISK_FULL = """
import os, resource
if os.environ["RANK"] == "0":
    resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))
from bridgecore.cli import main
raise SystemExit(main())
"""


def _left(out: Path) -> list[str]:
    return [name for name in siblings(out) if name != out.name] + ([out.name] if out.exists() else [])


@pytest.mark.parametrize("script", [SHRINKS_WHILE_READ], ids=["mid-read"])
def test_source_shrinking_while_read_is_one_line(llama_dir: Path, tmp_path: Path, script: str) -> None:
    out = tmp_path / "out"
    line = run_process("import", llama_dir, out, prelude=script, timeout=240).error_line()
    assert f"{llama_dir / SHARD2}: ends at byte" in line and "truncated or replaced while being read" in line
    assert _left(out) == []


def test_source_shrinking_after_read_does_not_kill_the_import(llama_dir: Path, tmp_path: Path) -> None:
    """Params that took their values from the source are saved after it shrank: a mapped file raised
    SIGBUS here (exit 135, nothing printed, the temporary left)."""
    out = tmp_path / "out"
    done = run_process("import", llama_dir, out, prelude=SHRINKS_DURING_SAVE, timeout=240)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert siblings(out) == ["out"] and (out / "release" / ".metadata").is_file()


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 400 KiB tmpfs filled to the last byte."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the file size limit tests cover it")
    try:
        fd = os.open(mount / "ballast", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass  # full
        finally:
            os.close(fd)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("flags", [[], ["--offline"]], ids=["default", "offline"])
def test_import_onto_a_full_disk_is_one_line(cli: Cli, llama_dir: Path, full_disk: Path, flags: list[str]) -> None:
    """The default import's first write is megatron-core's common state, whose torch.save reported a
    full disk as a 33-line "basic_ios::clear" traceback."""
    out = full_disk / "out"
    line = cli("import", llama_dir, out, *flags).error_line()
    assert f"{out}: writing the torch_dist checkpoint failed (" in line
    assert "0 bytes free on that disk" in line and "the output path was left as it was" in line
    assert _left(out) == []


def test_common_state_refused_by_a_file_size_limit_is_one_line(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))

    line = run_process("import", llama_dir, out, preexec_fn=limit, timeout=240).error_line()
    assert "the file system refused a write; torch.save reports" in line
    assert "a file size limit of 300 bytes (ulimit -f)" in line and _left(out) == []


@pytest.mark.parametrize(
    ("signum", "wait", "expected", "status"),
    [
        (signal.SIGTERM, 0.3, "stopped by SIGTERM; the output path was left as it was", 143),
        (signal.SIGTERM, 2.5, "stopped by SIGTERM; the output path was left as it was", 143),
        (signal.SIGINT, 1.5, "interrupted (Ctrl-C); the output path was left as it was", 130),
    ],
    ids=["term-early", "term-late", "int-mid"],
)
def test_signal_during_the_write_is_an_interruption(
    llama_dir: Path, tmp_path: Path, signum: int, wait: float, expected: str, status: int
) -> None:
    """A signal that lands inside torch.save's stream writer was reported as a failed write ("unexpected
    pos ...", exit 2) in 4 of 6 tries."""
    out = tmp_path / "out"
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731 - Ctrl-C as at a terminal
    proc = cli_process("import", llama_dir, out, prelude=SLOW_WRITES, preexec_fn=restore)
    deadline = time.monotonic() + 240
    while not list((tmp_path).glob(".out.tmp-*/release")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    time.sleep(wait)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("bridgecore: error:")]
    assert proc.returncode == status and errors == [f"bridgecore: error: {expected}"], err[-3000:]
    assert "Traceback" not in err and _left(out) == []


def _torchrun(script: Path, *args: object, timeout: int) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, BRIDGECORE_PLUGINS=EXAMPLE, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", BRIDGECORE_TIMEOUT="300"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("flags", [["--tp", "2"], ["--offline", "--tp", "2"]], ids=["default", "offline"])
def test_rank_failing_inside_the_save_tells_every_rank_at_once(
    llama_dir: Path, tmp_path: Path, flags: list[str]
) -> None:
    """Rank 0's write fails while rank 1 is inside the save: every rank waited for the whole timeout
    (1800 s by default), then said another rank died, never naming the disk."""
    script = tmp_path / "rank0_disk_full.py"
    script.write_text(RANK0_DISK_FULL)
    out = tmp_path / "out"
    start = time.monotonic()
    try:
        done = _torchrun(script, "import", llama_dir, out, *flags, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks waited for each other after rank 0 failed")
    # far below the 300 s each collective may wait: nobody waited for the timeout
    assert time.monotonic() - start < 150
    errors = [line for line in done.stderr.splitlines() if line.startswith("bridgecore: error:")]
    # each rank prints the first error, the rank that published it named by the others
    causes = {re.sub(r"^bridgecore: error: (rank \d: )?", "", line) for line in errors}
    assert done.returncode != 0 and len(errors) == 2 and len(causes) == 1, done.stderr[-4000:]
    cause = causes.pop()
    assert cause.startswith(f"{out}: writing the torch_dist checkpoint failed (")
    assert "File too large" in cause or "a file size limit of 300 bytes" in cause
    # torchrun's own report of the failed rank is the only traceback
    assert not re.search(r'File "[^"]*bridgecore', done.stderr) and _left(out) == []


def test_side_file_symlinked_outside_the_checkpoint_is_refused(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("a private key")
    (llama_dir / "tokenizer.json").symlink_to(secret)
    for args in (("import", llama_dir, tmp_path / "out"), ("roundtrip", llama_dir)):
        line = cli(*args).error_line()
        assert f"{llama_dir / 'tokenizer.json'}: is a symlink to {secret}, outside the checkpoint directory" in line
    assert _left(tmp_path / "out") == []


def test_side_files_of_a_hub_cache_snapshot_are_copied(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    """The Hugging Face cache's layout: every file of a snapshot is a symlink into ../../blobs."""
    repo = tmp_path / "models--org--llama"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for path in sorted(llama_dir.iterdir()):
        blob = blobs / f"blob-{path.name}"
        path.rename(blob)
        (snapshot / path.name).symlink_to(Path("../../blobs") / blob.name)
    (blobs / "blob-tokenizer.json").write_text('{"version": "1.0"}')
    (snapshot / "tokenizer.json").symlink_to(Path("../../blobs/blob-tokenizer.json"))
    out = tmp_path / "megatron"
    assert cli("import", snapshot, out).returncode == 0
    assert (out / "hf" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert not (out / "hf" / "tokenizer.json").is_symlink()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"num_hidden_layers": 0}, "num_hidden_layers is 0; expected a positive integer"),
        ({"num_hidden_layers": 2.0}, "num_hidden_layers is 2.0; expected a positive integer"),
        ({"rope_theta": "big"}, 'rope_theta is "big"; expected a finite number above 0'),
        ({"rope_theta": float("nan")}, "rope_theta is NaN; expected a finite number above 0"),
        ({"rms_norm_eps": "abc"}, 'rms_norm_eps is "abc"; expected a finite number above 0'),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps is -1.0; expected a finite number above 0"),
        (
            {"partial_rotary_factor": 2.0},
            "partial_rotary_factor is 2.0; expected a finite number above 0 and at most 1",
        ),
        ({"tie_word_embeddings": "yes"}, 'tie_word_embeddings is "yes"; expected true or false'),
        ({"rope_parameters": {"rope_theta": -5}}, "rope_parameters.rope_theta is -5; expected a finite number above 0"),
    ],
    ids=[
        "layers-0",
        "layers-float",
        "theta-text",
        "theta-nan",
        "eps-text",
        "eps-negative",
        "rotary-2",
        "tie-text",
        "rope-parameters",
    ],
)
def test_config_value_of_the_wrong_kind_is_one_line(
    cli: Cli, llama_dir: Path, tmp_path: Path, changes: dict[str, object], expected: str
) -> None:
    edit_config(llama_dir, **changes)
    for args in (("inspect", llama_dir), ("import", llama_dir, tmp_path / "out"), ("verify", llama_dir)):
        line = cli(*args).error_line()
        assert line == f"bridgecore: error: {llama_dir / 'config.json'}: {expected}", line
    assert _left(tmp_path / "out") == []


def test_plugin_declared_config_values_are_checked(cli: Cli, tmp_path: Path) -> None:
    from bridgecore.testing import write_tiny

    hf = write_tiny("qwen35", "qwen35-moe", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    text = config.get("text_config", config)
    text["linear_num_value_heads"] = -2
    (hf / "config.json").write_text(json.dumps(config))
    where = "text_config.linear_num_value_heads" if "text_config" in config else "linear_num_value_heads"
    line = cli("inspect", hf, plugins="qwen35").error_line()
    assert line.endswith(f"config.json: {where} is -2; expected a positive integer"), line


@pytest.mark.parametrize("side", ["Megatron", "reference", "both"])
def test_verify_fails_on_non_finite_logits(
    cli: Cli, llama_dir: Path, monkeypatch: pytest.MonkeyPatch, side: str
) -> None:
    """verify passed NaN: its check was `relative > rtol`, which NaN never is."""
    import torch

    from bridgecore.megatron.config import ModelConfig

    if side in ("Megatron", "both"):
        forward = ModelConfig.forward_logits

        def nan_at_3_5(self: ModelConfig, *args: object) -> torch.Tensor:
            logits = forward(self, *args).clone()
            logits[0, 3, 5] = float("nan")
            return logits

        monkeypatch.setattr(ModelConfig, "forward_logits", nan_at_3_5)
    if side in ("reference", "both"):
        rewrite(llama_dir, lambda t: t["model.norm.weight"].fill_(float("inf")))
    done = cli("verify", llama_dir)
    line = done.error_line()
    if side == "Megatron":
        assert (
            "the Megatron logits hold 1 non-finite values of" in line and "(the first, nan, at index [0, 3, 5])" in line
        )
    if side in ("reference", "both"):
        assert "the reference logits hold" in line
    assert line.endswith("expected finite logits on both sides")
