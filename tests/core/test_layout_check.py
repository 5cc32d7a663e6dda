"""One layout check for every path: each parallel size against what it must divide, before any work.

The unit tests run the check on the configs the plugins make from their tiny checkpoints, changed
in one value each; the CLI tests show the in-memory, offline and torchrun paths refuse a layout
with the same one-line error, leaving no output behind.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from cli_runner import run_cli

from bridgecore import AutoBridge
from bridgecore.errors import BridgeError
from bridgecore.megatron.parallel import Layout, check_divisible
from bridgecore.plugins import installed

PLUGINS = "llama_example"


def _config(tmp_path_factory: pytest.TempPathFactory, name: str, **changes: object) -> object:
    """The Megatron config of tiny model ``name`` with ``changes`` applied (no re-validation)."""
    found = [t for ts in installed().call_all("tiny_models") for t in (ts or []) if t.name == name]
    if not found:
        pytest.skip(f"no installed plugin ships tiny model {name}")
    tiny = found[0]
    hf = tmp_path_factory.mktemp(name) / "hf"
    tiny.write(hf)
    config = copy.copy(AutoBridge.from_hf_pretrained(hf, weights=False).config)
    for field, value in changes.items():
        setattr(config, field, value)
    return config


CASES = [
    # (tiny model, config changes, layout, expected message)
    ("llama-example", {"num_layers": 5}, Layout(pp=2), r"--pp 2: num_layers = 5 does not divide by 2"),
    (
        "llama-example",
        {"num_layers": 8},
        Layout(pp=2, vpp=3),
        r"--vpp 3: the 4 layers of each of the 2 pipeline ranks do not divide by 3",
    ),
    ("llama-example", {}, Layout(vpp=2), r"--vpp 2: virtual pipeline stages need --pp 2 or more"),
    (
        "llama-example",
        {"num_layers": 6, "account_for_embedding_in_pipeline_split": True},
        Layout(pp=2),
        r"--pp 2: num_layers \+ 1 \(embedding\) = 7 does not divide by 2",
    ),
    ("llama-example", {}, Layout(tp=3), r"--tp 3: num_attention_heads 4 does not divide by 3"),
    ("llama-example", {}, Layout(ep=2), r"--ep 2: this model has no experts to split"),
    ("llama-example", {}, Layout(tp=0), r"--tp 0: expected a positive integer"),
    (
        "qwen35-dense",
        {"num_attention_heads": 4, "num_query_groups": 4, "linear_num_key_heads": 2, "linear_num_value_heads": 4},
        Layout(tp=4),
        r"--tp 4: linear_num_key_heads 2 does not divide by 4",
    ),
    ("qwen35-moe", {"num_moe_experts": 4}, Layout(ep=3), r"--ep 3: num_moe_experts 4 does not divide by 3"),
    ("qwen35-moe", {"moe_ffn_hidden_size": 6}, Layout(etp=4), r"--etp 4: moe_ffn_hidden_size 6 does not divide by 4"),
    (
        "step35",
        {"num_attention_heads": 4, "num_query_groups": 2, "sliding_num_attention_heads": 3},
        Layout(tp=2),
        r"--tp 2: sliding_num_attention_heads 3 does not divide by 2",
    ),
]


@pytest.mark.parametrize(
    ("name", "changes", "layout", "message"),
    CASES,
    ids=[f"{name}-{'-'.join(changes) or 'as-is'}-{layout}" for name, changes, layout, _ in CASES],
)
def test_layout_check_names_the_value_and_what_it_must_divide(
    tmp_path_factory: pytest.TempPathFactory, name: str, changes: dict, layout: Layout, message: str
) -> None:
    config = _config(tmp_path_factory, name, **changes)
    with pytest.raises(BridgeError, match=message):
        check_divisible(config, layout)


def test_layout_check_accepts_an_even_split(tmp_path_factory: pytest.TempPathFactory) -> None:
    check_divisible(_config(tmp_path_factory, "llama-example", num_layers=8), Layout(tp=2, pp=2, vpp=2))


def _odd_layers(llama_dir: Path) -> Path:
    """The tiny checkpoint claiming 3 layers: the layout check must refuse --pp 2 before reading any tensor."""
    config = json.loads((llama_dir / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (llama_dir / "config.json").write_text(json.dumps(config))
    return llama_dir


@pytest.mark.parametrize(
    ("flags", "nproc"),
    [(["--pp", "2"], 1), (["--pp", "2", "--offline"], 1), (["--pp", "2"], 2)],
    ids=["in-memory", "offline", "torchrun"],
)
def test_every_path_refuses_the_layout_before_any_work(
    llama_dir: Path, tmp_path: Path, flags: list[str], nproc: int
) -> None:
    out = tmp_path / "megatron"
    result = run_cli("import", str(_odd_layers(llama_dir)), str(out), *flags, nproc=nproc, plugins=PLUGINS)
    assert result.returncode != 0
    assert "bridgecore: error: --pp 2: num_layers = 3 does not divide by 2" in result.stderr, result.stderr
    # not blamed on the plugin, no megatron-core assertion (torchrun adds its own report of the exit)
    assert "plugin llama_example" not in result.stderr and "AssertionError" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".megatron.*"))


def test_offline_import_checks_the_layout(llama_dir: Path, tmp_path: Path) -> None:
    result = run_cli("import", str(llama_dir), str(tmp_path / "out"), "--offline", "--tp", "3", plugins=PLUGINS)
    assert result.returncode == 2, result.stderr
    assert "bridgecore: error: --tp 3: num_attention_heads 4 does not divide by 3" in result.stderr
    assert not (tmp_path / "out").exists()


def test_offline_import_checks_expert_parallelism(tmp_path: Path) -> None:
    found = [t for ts in installed().call_all("tiny_models") for t in (ts or []) if t.name == "qwen35-moe"]
    if not found:
        pytest.skip("plugin qwen35 is not installed")
    found[0].write(tmp_path / "hf")
    flags = ["--offline", "--tp", "2", "--ep", "3"]
    result = run_cli("import", str(tmp_path / "hf"), str(tmp_path / "out"), *flags, plugins="qwen35")
    assert result.returncode == 2, result.stderr
    assert "bridgecore: error: --ep 3: num_moe_experts 4 does not divide by 3" in result.stderr
    assert not (tmp_path / "out").exists()
