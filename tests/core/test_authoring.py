"""Writing a plugin: the core's defaults from a named transformers class, the scaffold, the public
conformance helper, and ``inspect`` showing what a mapping table still lacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from safetensors import safe_open

import bridgecore_llama_example
from bridgecore import cli
from bridgecore.defaults import write_transformers_checkpoint
from bridgecore.hookspecs import hookimpl
from bridgecore.plugins import Plugins
from bridgecore.testing import ALL_LAYOUTS, check_roundtrip, check_tiny_model, tiny_model_names


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out |= {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return out


def test_naming_the_transformers_class_claims_it_and_gets_the_defaults() -> None:
    plugins = Plugins(load_entry_points=False)
    plugins.register(bridgecore_llama_example, name="llama_example")
    info = plugins.infos["llama_example"]
    assert info.architectures == ["LlamaForCausalLM"]
    assert info.defaults == ["hf_reference", "tiny_models"] and "hf_reference" not in info.hooks
    config = {"architectures": ["LlamaForCausalLM"]}
    assert plugins.call_owned("hf_reference", info, hf_config=config) is not None
    assert [t.name for t in plugins.call_owned("tiny_models", info)] == ["llama-example"]


def test_a_plugins_own_hook_wins_over_the_default() -> None:
    class Own:
        transformers_models = staticmethod(bridgecore_llama_example.transformers_models)

        @staticmethod
        @hookimpl
        def tiny_models() -> list:
            return []

    plugins = Plugins(load_entry_points=False)
    plugins.register(Own(), name="own")
    assert plugins.infos["own"].defaults == ["hf_reference"]
    assert plugins.call_owned("tiny_models", plugins.infos["own"]) == []


def test_default_tiny_model_is_written_by_transformers_and_seeded(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {**bridgecore_llama_example.TINY_CONFIG, "architectures": ["LlamaForCausalLM"]}
    write_transformers_checkpoint(tmp_path / "a", config, seed=3)
    write_transformers_checkpoint(tmp_path / "b", config, seed=3)
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert sorted((tmp_path / "a").glob("model-*.safetensors"))[-1].name == "model-00002-of-00002.safetensors"
    expected = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    assert set(a) == set(expected.state_dict())
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, b[n]) for n, t in a.items())
    # norms are drawn too: a mapping swapping the two norms of a layer cannot round-trip unnoticed
    assert not torch.equal(
        a["model.layers.0.input_layernorm.weight"], a["model.layers.0.post_attention_layernorm.weight"]
    )
    assert json.loads((tmp_path / "a" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_inspect_prints_the_table_with_the_gaps_marked(llama_dir: Path) -> None:
    """A config that ties the embeddings while the checkpoint keeps lm_head: one HF tensor is left over."""
    config = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    result = run_cli("inspect", str(llama_dir), plugins="llama_example")
    assert result.returncode == 2
    assert "1 checkpoint tensors are not mapped: lm_head.weight" in result.stderr.strip().splitlines()[-1]
    rows = result.stdout.splitlines()
    assert any(r.startswith("decoder.layers.1.mlp.linear_fc1.weight") and "GatedMLP" in r for r in rows)
    assert any("UNMAPPED HF" in r and r.endswith("lm_head.weight") for r in rows)
    assert "gaps: 0 Megatron params, 1 HF tensors" in result.stdout
    with pytest.raises(AssertionError, match="lm_head.weight"):  # and the conformance helper fails on it
        check_roundtrip(llama_dir, plugin="llama_example")


def _fill_in_qwen3(module: Path) -> None:
    """What an author adds to the scaffold for Qwen3 dense: q/k norms, in the config and the mappings."""
    text = module.read_text()
    edits = {
        '        normalization="RMSNorm",\n': '        normalization="RMSNorm",\n        qk_layernorm=True,\n',
        '        RowParallel(layer + "self_attention.linear_proj.weight"': (
            '        Replicated(layer + "self_attention.q_layernorm.weight", hf_layer + "self_attn.q_norm.weight"),\n'
            '        Replicated(layer + "self_attention.k_layernorm.weight", hf_layer + "self_attn.k_norm.weight"),\n'
            '        RowParallel(layer + "self_attention.linear_proj.weight"'
        ),
    }
    for anchor, replacement in edits.items():
        assert text.count(anchor) == 1, anchor
        text = text.replace(anchor, replacement)
    module.write_text(text)


@pytest.fixture(scope="module")
def qwen3_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bridgecore new-plugin`` for transformers' Qwen3ForCausalLM (a family we do not ship), filled
    in, and pip-installed (a real wheel with its entry point) into a directory of its own."""
    work = tmp_path_factory.mktemp("qwen3")
    assert (
        cli.main(["new-plugin", "qwen3_dense", "--architecture", "Qwen3ForCausalLM", "--out", str(work / "src")]) == 0
    )
    names = {str(p.relative_to(work / "src")) for p in (work / "src").rglob("*") if p.is_file()}
    assert names == {
        "pyproject.toml",
        "README.md",
        "CHANGELOG.md",
        "noxfile.py",
        "src/bridgecore_qwen3_dense/__init__.py",
        "tests/test_qwen3_dense.py",
    }
    _fill_in_qwen3(work / "src" / "src" / "bridgecore_qwen3_dense" / "__init__.py")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(work / "site"), str(work / "src")], check=True, timeout=300)
    return work


@pytest.fixture
def installed_qwen3(qwen3_plugin: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The installed plugin, seen by this process and by the ``bridgecore`` children."""
    site = str(qwen3_plugin / "site")
    monkeypatch.syspath_prepend(site)
    monkeypatch.setenv("PYTHONPATH", site)
    return "qwen3_dense"


def test_scaffold_plugin_for_qwen3_passes_its_own_conformance_tests(installed_qwen3: str, qwen3_plugin: Path) -> None:
    """The scaffold's test file, run as its author runs it (pytest in the plugin's directory, its
    pyproject's options): roundtrip at TP1 bit-exact and verify, through bridgecore.testing."""
    assert tiny_model_names(installed_qwen3) == ["qwen3_dense-tiny"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_qwen3_dense.py"],
        cwd=qwen3_plugin / "src",
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0 and "1 passed, 1 deselected" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_scaffold_plugin_for_qwen3_at_every_layout(installed_qwen3: str, tmp_path: Path) -> None:
    results = check_tiny_model(installed_qwen3, "qwen3_dense-tiny", tmp_path, layouts=ALL_LAYOUTS, verify=False)
    assert list(results) == ["roundtrip tp1", "roundtrip tp2", "roundtrip pp2"]  # dense: no EP


def test_new_plugin_refuses_an_architecture_transformers_lacks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["new-plugin", "x", "--architecture", "NoSuchForCausalLM", "--out", str(tmp_path / "x")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("bridgecore: error: architecture NoSuchForCausalLM: transformers")
    assert "\n" not in line and not (tmp_path / "x").exists()
