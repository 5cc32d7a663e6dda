"""The CLI end to end on the third-party example plugin: every command, single- and multi-rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli

from bridgecore.compare import compare_checkpoints

PLUGINS = "llama_example"
COMMANDS = ["plugins", "inspect", "import", "export", "export-adapter", "import-adapter", "roundtrip", "verify", "demo"]


def test_help_explains_every_command() -> None:
    top = run_cli("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in COMMANDS) and "torchrun" in top.stdout
    for command in COMMANDS:
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "usage: bridgecore " + command in result.stdout


def test_plugins_lists_the_example_with_its_hooks() -> None:
    out = run_cli("plugins", plugins=PLUGINS).stdout
    assert "llama_example  (bridgecore-llama-example 0.1.0)" in out
    assert "LlamaForCausalLM" in out and "mappings" in out and "provider_config" in out
    assert "adapters:      LoRA (export-adapter, import-adapter), from its mappings" in out


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary directory the CLI's children use, to see what they leave behind."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    return scratch


def test_roundtrip_single_rank_is_bit_exact(llama_dir: Path, scratch: Path) -> None:
    result = run_cli("roundtrip", str(llama_dir), "--verbose", plugins=PLUGINS)
    assert result.returncode == 0, result.stderr
    assert "21/21 tensors identical: bit-exact" in result.stdout
    assert result.stdout.count("exact ") == 21
    assert not list(scratch.glob("bridgecore-roundtrip-*"))  # the discarded output is removed


@pytest.mark.parametrize("layout,nproc", [(["--tp", "2"], 2), (["--pp", "2"], 2), (["--tp", "2", "--pp", "2"], 4)])
def test_roundtrip_multi_rank_is_bit_exact(llama_dir: Path, scratch: Path, layout: list[str], nproc: int) -> None:
    result = run_cli("roundtrip", str(llama_dir), *layout, nproc=nproc, plugins=PLUGINS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bit-exact" in result.stdout
    assert not list(scratch.glob("bridgecore-roundtrip-*"))


def test_import_at_tp2_then_export_at_pp2_through_torch_dist(llama_dir: Path, tmp_path: Path) -> None:
    megatron, out = tmp_path / "megatron", tmp_path / "out"
    assert run_cli("import", str(llama_dir), str(megatron), "--tp", "2", nproc=2, plugins=PLUGINS).returncode == 0
    assert (megatron / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (megatron / "release" / ".metadata").is_file() and (megatron / "bridgecore.json").is_file()
    result = run_cli("export", str(megatron), str(out), "--pp", "2", nproc=2, plugins=PLUGINS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert compare_checkpoints(llama_dir, out).exact


def test_verify_matches_transformers_llama(llama_dir: Path) -> None:
    result = run_cli("verify", str(llama_dir), "--rtol", "1e-5", plugins=PLUGINS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "argmax agreement 100.0%" in result.stdout


def test_inspect_prints_config_table_and_coverage(llama_dir: Path) -> None:
    out = run_cli("inspect", str(llama_dir), plugins=PLUGINS).stdout
    assert "num_query_groups                         2" in out
    assert "moe_router_topk" not in out  # megatron-core's MoE defaults are not shown for a dense model
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in out and "FusedQKV" in out
    assert "coverage: 15 Megatron tensors <- 21 of 21 HF tensors" in out


@pytest.mark.parametrize("command", ["--help", "plugins", "inspect"])
def test_what_each_command_imports(llama_dir: Path, command: str) -> None:
    """``--help`` and ``plugins`` load neither torch nor megatron-core; a converting command loads
    megatron-core only after setting up its deferred compile, so torch's dynamo and inductor stay
    unloaded (importing megatron-core first, anywhere, would load them: about 800 modules, seconds)."""
    args = {"--help": ["--help"], "plugins": ["plugins"], "inspect": ["inspect", str(llama_dir)]}[command]
    code = (
        "import sys\nfrom bridgecore.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in ('torch', 'megatron.core', 'torch._dynamo', 'torch._inductor')"
        " if m in sys.modules))"
    )
    env = dict(os.environ, BRIDGECORE_PLUGINS=PLUGINS, PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    loaded = next(line for line in done.stdout.splitlines() if line.startswith("LOADED"))
    expected = [] if command != "inspect" else ["megatron.core", "torch"]
    assert loaded == f"LOADED {expected}", done.stderr[-2000:]


def test_demo_runs_the_example(tmp_path: Path) -> None:
    result = run_cli("demo", "--only", "llama-example", "--out", str(tmp_path), plugins=PLUGINS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "llama-example" in result.stdout and "bit-exact" in result.stdout
    assert (tmp_path / "llama-example" / "megatron" / "release").is_dir()


def test_demo_without_out_leaves_nothing_behind(scratch: Path) -> None:
    result = run_cli("demo", "--only", "llama-example", plugins=PLUGINS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bit-exact" in result.stdout and "pass --out DIR to keep them" in result.stdout
    assert not list(scratch.glob("bridgecore-demo-*"))


def test_python_api_export_iterator_equals_source(llama_dir: Path) -> None:
    import bridgecore_llama_example
    from bridgecore import AutoBridge, export_hf_weights
    from bridgecore.hf.reader import CheckpointReader
    from bridgecore.megatron import parallel
    from bridgecore.plugins import Plugins

    plugins = Plugins(load_entry_points=False)
    plugins.register(bridgecore_llama_example, name="llama_example")
    bridge = AutoBridge.from_hf_pretrained(llama_dir, plugins=plugins)
    try:
        model = bridge.to_megatron_model()
        exported = dict(export_hf_weights(bridge, model))
    finally:
        parallel.leave()  # the one-process group the model needed: later tests in this process start afresh
    with CheckpointReader(llama_dir) as source:
        assert set(exported) == set(source.keys())
        for name in source.keys():
            assert torch.equal(exported[name], source.read(name, ())), name
