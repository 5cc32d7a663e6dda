"""What a newcomer met on a fresh clone: each answer is one line that says what to run instead."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from reliability_support import Result, siblings

from bridgecore.megatron import parallel

Cli = Callable[..., Result]


@pytest.fixture(autouse=True)
def no_process_group_left() -> Iterator[None]:
    yield
    parallel.leave()


def test_layout_larger_than_one_process_says_torchrun_or_offline(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "megatron"
    line = cli("import", llama_dir, out, "--tp", "2").error_line()
    assert "does not fit a world of 1 processes" in line and "torchrun --nproc-per-node 2 -m bridgecore" in line
    assert "--offline" in line and siblings(out) == []
    parallel.leave()
    assert cli("import", llama_dir, out, "--offline", "--tp", "2").returncode == 0


def test_help_examples_that_run_in_one_process_fit_one_process() -> None:
    from bridgecore.cli import EPILOG

    for line in EPILOG.splitlines():
        if line.strip().startswith("bridgecore ") and "--offline" not in line:
            assert not any(f"--{flag} " in line for flag in ("tp", "pp", "ep", "etp")), line


def test_verify_without_transformers_names_the_extra(
    cli: Cli, llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    line = cli("verify", llama_dir).error_line()
    assert "transformers, which is not installed; pip install '" in line and "[verify]'" in line


def test_demo_out_refuses_an_existing_target_without_overwrite(cli: Cli, tmp_path: Path) -> None:
    target = tmp_path / "llama-example"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    line = cli("demo", "--out", tmp_path).error_line()
    assert f"{target}: already exists" in line and "--overwrite" in line
    assert (target / "mine.txt").read_text() == "keep me"
    assert cli("demo", "--out", tmp_path, "--overwrite").returncode == 0 and not (target / "mine.txt").exists()


def test_unknown_plugin_name_lists_the_installed_ones(cli: Cli) -> None:
    line = cli("plugins", plugins="nosuch").error_line()
    assert "BRIDGECORE_PLUGINS names nosuch, which is not installed; installed:" in line and "llama_example" in line


def test_torch_dist_checkpoint_given_to_import_hints_export(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    megatron = tmp_path / "megatron"
    assert cli("import", llama_dir, megatron).returncode == 0
    line = cli("import", megatron, tmp_path / "again").error_line()
    assert (
        f"{megatron}: is a Megatron torch_dist checkpoint" in line and f"bridgecore export {megatron} OUT_DIR" in line
    )
