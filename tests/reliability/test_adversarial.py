"""Adversarial probing: nothing a run did not create is deleted, sizes the files cannot back are refused
before allocating, and every failure found (writer threads, a full disk, Ctrl-C, a file changed while
read, files of another model) is one `bridgecore: error:` line with the output left as it was."""

from __future__ import annotations

import resource
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reliability_support import Result, cli_process, edit_config, rewrite, run_process, siblings
from test_atomic_outputs import snapshot

from bridgecore import AutoBridge
from bridgecore.megatron import checkpoint

Cli = Callable[..., Result]
SHARD1 = "model-00001-of-00002.safetensors"
#: the offline import makes each chunk when a writer thread asks; slowed, Ctrl-C lands mid-save.
SLOW_OFFLINE = """
import time
from bridgecore import offline
_make = offline._StreamingSavePlanner._make
offline._StreamingSavePlanner._make = lambda self, recipe: (time.sleep(0.3), _make(self, recipe))[1]
"""


@pytest.mark.parametrize("flags", [[], ["--offline"]], ids=["default", "offline"])
def test_directory_appearing_at_the_output_during_import_is_kept(
    cli: Cli, llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str]
) -> None:
    out = tmp_path / "out"
    real = checkpoint.publish

    def someone_else_writes_first(temp: Path, out_dir: Path, *args: object) -> None:
        out_dir.mkdir()
        (out_dir / "theirs.txt").write_text("another run's output")
        real(temp, out_dir, *args)

    monkeypatch.setattr(checkpoint, "publish", someone_else_writes_first)
    line = cli("import", llama_dir, out, *flags).error_line()
    assert f"{out}: already exists" in line and "--overwrite" in line
    assert snapshot(out) == {"theirs.txt": b"another run's output"} and siblings(out) == ["out"]


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_output_overlapping_the_input_is_refused(cli: Cli, llama_dir: Path, tmp_path: Path, where: str) -> None:
    before = snapshot(llama_dir)
    out = {"same": llama_dir, "inside": llama_dir / "megatron", "containing": llama_dir.parent}[where]
    for args in (("import", llama_dir, out), ("roundtrip", llama_dir, "--keep", out)):
        line = cli(*args, "--overwrite").error_line()
        assert f"the input {llama_dir}; expected an output directory apart from the input" in line
    assert snapshot(llama_dir) == before


def test_export_over_its_own_input_is_refused(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    megatron = tmp_path / "megatron"
    assert cli("import", llama_dir, megatron).returncode == 0
    before = snapshot(megatron)
    for flags in ([], ["--offline"]):
        line = cli("export", megatron, megatron, "--overwrite", *flags).error_line()
        assert f"{megatron}: is the input {megatron}" in line
    assert snapshot(megatron) == before


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


@pytest.mark.parametrize("flags", [[], ["--offline"]], ids=["default", "offline"])
def test_layer_count_the_files_cannot_back_is_refused(llama_dir: Path, tmp_path: Path, flags: list[str]) -> None:
    """A child process under an 8 GiB address-space limit: before, this grew memory without bound."""
    edit_config(llama_dir, num_hidden_layers=2**31 - 1)
    out = tmp_path / "out"
    line = run_process("import", llama_dir, out, *flags, preexec_fn=limit_memory, timeout=240).error_line()
    assert "num_layers is 2147483647, but the checkpoint holds only 21 tensors" in line
    assert siblings(out) == []


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("hidden_size", 2**30, "hidden_size is 1073741824, larger than the checkpoint's largest tensor"),
        ("vocab_size", 2**31 - 1, "vocab_size is 2147483647, larger than the checkpoint's largest tensor"),
    ],
)
def test_sizes_the_files_cannot_back_are_refused(
    cli: Cli, llama_dir: Path, tmp_path: Path, key: str, value: int, expected: str
) -> None:
    edit_config(llama_dir, **{key: value})
    line = cli("import", llama_dir, tmp_path / "out").error_line()
    assert expected in line and siblings(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (torch.rand(64, dtype=torch.float32), "casting torch.float32 to torch.bfloat16 would change values"),
        (torch.ones(60, dtype=torch.bfloat16), "made shape [60]"),
    ],
    ids=["lossy-cast", "shape"],
)
def test_offline_writer_thread_errors_are_one_line(
    cli: Cli, llama_dir: Path, tmp_path: Path, tensor: torch.Tensor, expected: str
) -> None:
    rewrite(llama_dir, lambda t: t.update({"model.layers.0.input_layernorm.weight": tensor}))
    out = tmp_path / "out"
    line = cli("import", llama_dir, out, "--offline").error_line()
    assert expected in line and "decoder.layers.0" in line and siblings(out) == []


@pytest.mark.parametrize("flags", [[], ["--offline"]], ids=["default", "offline"])
def test_file_size_limit_import_fails_in_one_line(llama_dir: Path, tmp_path: Path, flags: list[str]) -> None:
    """A full disk without privileges: RLIMIT_FSIZE makes writes past 20 kB fail (EFBIG)."""
    out = tmp_path / "out"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    line = run_process("import", llama_dir, out, *flags, preexec_fn=limit).error_line()
    # the cause as the writer reports it: EFBIG, or (torch.save's writer on megatron-core 0.19) a bad position
    assert f"{out}: writing the torch_dist checkpoint failed (" in line
    assert "bytes free on that disk, a file size limit of 20000 bytes (ulimit -f)" in line and siblings(out) == []


def test_ctrl_c_during_offline_import(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Ctrl-C at a terminal: a runner started as a background job (SIGINT ignored, which children inherit)
    # would otherwise drop the signal before bridgecore sees it.
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = cli_process("import", llama_dir, out, "--offline", prelude=SLOW_OFFLINE, preexec_fn=restore)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(".out.tmp-*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("bridgecore: error:")] == [
        "bridgecore: error: interrupted (Ctrl-C); the output path was left as it was"
    ]
    assert siblings(out) == []


def test_shard_truncated_while_importing_names_the_file(
    cli: Cli, llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = llama_dir / SHARD1
    build = AutoBridge.to_megatron_model

    def truncated_meanwhile(self: AutoBridge, *args: object, **kwargs: object) -> object:
        shard.write_bytes(shard.read_bytes()[:-100])  # after the headers were checked
        return build(self, *args, **kwargs)

    monkeypatch.setattr(AutoBridge, "to_megatron_model", truncated_meanwhile)
    out = tmp_path / "out"
    line = cli("import", llama_dir, out).error_line()
    assert f"{shard}: ends at byte" in line and "truncated or replaced while being read" in line
    assert siblings(out) == []


def test_metadata_of_another_model_is_one_line_in_export(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-hf"
    shutil.copytree(llama_dir, other)

    def narrower_mlp(tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
                tensors[name] = t[:96].contiguous()
            elif ".mlp.down_proj." in name:
                tensors[name] = t[:, :96].contiguous()

    edit_config(rewrite(other, narrower_mlp), intermediate_size=96)
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    assert cli("import", llama_dir, mine).returncode == 0
    assert cli("import", other, theirs).returncode == 0
    shutil.copy(theirs / "release" / ".metadata", mine / "release" / ".metadata")
    out = tmp_path / "out"
    line = cli("export", mine, out).error_line()
    # the saved shapes are checked against the model before any chunk is read
    assert f"{mine / 'release'}: decoder.layers.mlp.linear_fc1.weight has shape" in line
    assert "in the checkpoint but" in line
    assert siblings(out) == []
