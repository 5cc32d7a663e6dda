"""Bad input: each case is one `bridgecore: error:` line naming the culprit and what was expected,
exit status 2, and nothing written at the output path."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reliability_support import Result, edit_config, rewrite, run_process, siblings

Cli = Callable[..., Result]
SHARD1 = "model-00001-of-00002.safetensors"


def failed_import(cli: Cli, hf_dir: Path, out: Path, *flags: object, plugins: str = "llama_example") -> str:
    """Import `hf_dir` to `out`, expecting a clean failure that leaves nothing at or beside `out`, and no
    process group in this process (a later conversion in it, or a test after this one, starts afresh)."""
    line = cli("import", hf_dir, out, *flags, plugins=plugins).error_line()
    assert siblings(out) == [], siblings(out)
    assert not torch.distributed.is_initialized()
    return line


def test_missing_config_names_the_directory(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    (llama_dir / "config.json").unlink()
    line = failed_import(cli, llama_dir, tmp_path / "out")
    assert str(llama_dir) in line and "has no config.json" in line


def test_malformed_config_names_file_line_and_column(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    (llama_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n "hidden_size": 64,,}')
    line = failed_import(cli, llama_dir, tmp_path / "out")
    assert f"{llama_dir / 'config.json'}: not valid JSON" in line and "line 2 column" in line


def test_config_that_is_not_an_object(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    (llama_dir / "config.json").write_text("[1, 2]")
    assert "top level is a JSON list; expected an object" in failed_import(cli, llama_dir, tmp_path / "out")


def test_unknown_architecture_lists_plugins_and_hints_the_family(llama_dir: Path, tmp_path: Path) -> None:
    """The real CLI process: exit status 2 and a single stderr line, no traceback."""
    edit_config(llama_dir, architectures=["Step3p5ForCausalLM"])
    line = run_process("import", llama_dir, tmp_path / "out").error_line()
    assert "no installed plugin claims architecture Step3p5ForCausalLM" in line
    assert "installed: llama_example (LlamaForCausalLM)" in line
    assert "pip install --find-links WHEELHOUSE bridgecore-step35" in line
    assert siblings(tmp_path / "out") == []


def test_unknown_family_has_no_install_hint(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    edit_config(llama_dir, architectures=["GPT2LMHeadModel"])
    line = failed_import(cli, llama_dir, tmp_path / "out")
    assert "GPT2LMHeadModel" in line and "llama_example (LlamaForCausalLM)" in line and "pip install" not in line


def test_truncated_shard_names_the_file(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    shard = llama_dir / SHARD1
    shard.write_bytes(shard.read_bytes()[:-100])
    line = failed_import(cli, llama_dir, tmp_path / "out")
    assert str(shard) in line and "truncated" in line


def test_corrupt_header_names_the_file(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    shard = llama_dir / SHARD1
    data = bytearray(shard.read_bytes())
    data[8] = ord("X")
    shard.write_bytes(bytes(data))
    assert f"{shard}: header is not JSON" in failed_import(cli, llama_dir, tmp_path / "out")


def test_unknown_dtype_string_names_file_tensor_and_choices(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    shard = llama_dir / SHARD1
    shard.write_bytes(shard.read_bytes().replace(b'"BF16"', b'"BX16"', 1))
    line = failed_import(cli, llama_dir, tmp_path / "out")
    assert str(shard) in line and 'has dtype "BX16"; expected one of' in line and "BF16" in line


def test_index_pointing_to_a_missing_shard(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    (llama_dir / "model-00002-of-00002.safetensors").unlink()
    line = failed_import(cli, llama_dir, tmp_path / "out")
    assert "model.safetensors.index.json: names shard 'model-00002-of-00002.safetensors', which is not a file" in line


def test_wrong_shape_names_the_tensors_and_the_expected_shape(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    rewrite(
        llama_dir,
        lambda t: t.update({"model.layers.1.self_attn.q_proj.weight": torch.zeros(60, 64, dtype=torch.bfloat16)}),
    )
    line = failed_import(cli, llama_dir, tmp_path / "out")
    assert "decoder.layers.1.self_attention.linear_qkv.weight <- model.layers.1.self_attn.q_proj.weight" in line
    assert "HF rows [60, 32, 32], expected [64, 32, 32]" in line


def test_integer_tensor_for_a_float_param(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    name = "model.layers.0.input_layernorm.weight"
    rewrite(llama_dir, lambda t: t.update({name: torch.ones(64, dtype=torch.int32)}))
    line = failed_import(cli, llama_dir, tmp_path / "out")
    assert f"{name}: dtype torch.int32 in the checkpoint, expected a floating-point tensor" in line


def test_float_tensor_that_does_not_fit_the_param_dtype(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    name = "model.layers.0.input_layernorm.weight"
    rewrite(llama_dir, lambda t: t.update({name: torch.rand(64, dtype=torch.float32)}))
    line = failed_import(cli, llama_dir, tmp_path / "out")
    assert (
        name in line
        and "casting torch.float32 to torch.bfloat16 would change values" in line
        and "--params-dtype" in line
    )


def test_missing_tensor_is_listed(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    rewrite(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    line = failed_import(cli, llama_dir, tmp_path / "out")
    assert line.endswith("checkpoint lacks 1 tensors the mappings need: model.layers.1.mlp.up_proj.weight")


def test_extra_tensors_are_refused_then_waived_and_reported(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    extra = {
        "model.extra.weight": torch.zeros(3, dtype=torch.bfloat16),
        "model.more.bias": torch.zeros(2, dtype=torch.bfloat16),
    }
    rewrite(llama_dir, lambda t: t.update(extra))
    line = failed_import(cli, llama_dir, tmp_path / "out")
    assert (
        "2 checkpoint tensors are not mapped: model.extra.weight, model.more.bias" in line
        and "--allow-unmapped" in line
    )
    waived = cli(
        "import", llama_dir, tmp_path / "out", "--allow-unmapped", "model.extra.*", "--allow-unmapped", "*.bias"
    )
    assert waived.returncode == 0, waived.stderr
    assert "--allow-unmapped: left 2 unmapped: model.extra.weight, model.more.bias" in waived.stdout
    assert (tmp_path / "out" / "release").is_dir()


@pytest.mark.parametrize(
    "flag,size,named",
    [
        ("--tp", 3, "num_attention_heads 4 does not divide by 3"),
        ("--tp", 4, "num_query_groups 2 does not divide by 4"),
    ],
)
def test_tp_that_does_not_divide_names_the_config_value(
    cli: Cli, llama_dir: Path, tmp_path: Path, flag: str, size: int, named: str
) -> None:
    # Refused before the world-size check: the user learns what the model allows, not how many processes to start.
    line = failed_import(cli, llama_dir, tmp_path / "out", flag, size)
    assert f"{flag} {size}: {named}" in line and "num_attention_heads 4, num_query_groups 2" in line


@pytest.fixture
def step35_dir(tmp_path: Path) -> Path:
    step35 = pytest.importorskip("bridgecore_step35.tiny", reason="the step35 plugin provides the MoE checkpoint")
    step35.write_tiny(tmp_path / "step35")
    return tmp_path / "step35"


def test_ep_that_does_not_divide_the_experts(cli: Cli, step35_dir: Path, tmp_path: Path) -> None:
    line = failed_import(cli, step35_dir, tmp_path / "out", "--ep", 3, plugins="step35")
    assert "--ep 3: num_moe_experts 4 does not divide by 3" in line


@pytest.mark.parametrize("experts", [8, 2])
def test_expert_count_differing_from_the_config(cli: Cli, step35_dir: Path, tmp_path: Path, experts: int) -> None:
    edit_config(step35_dir, moe_num_experts=experts)
    line = failed_import(cli, step35_dir, tmp_path / "out", plugins="step35")
    assert "model.layers.2.moe.gate.weight" in line and "made shape [4, 64]" in line and f"has [{experts}, 64]" in line


def test_plugin_exception_is_one_line_naming_the_plugin(llama_dir: Path, tmp_path: Path) -> None:
    """A bug in a plugin (here: the example takes ``rope_parameters`` for an object) is reported, not dumped."""
    edit_config(llama_dir, rope_parameters="linear")
    line = run_process("inspect", llama_dir).error_line()
    assert "plugin llama_example (bridgecore-llama-example" in line and "AttributeError" in line
    assert "__init__.py:" in line and line.endswith("rerun with --traceback for details")
    full = run_process("inspect", llama_dir, "--traceback")
    assert full.returncode == 1 and "Traceback" in full.stderr and "bridgecore_llama_example" in full.stderr


def test_a_core_bug_keeps_its_traceback(cli: Cli, llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bridgecore import cli as cli_module

    def broken(args: object) -> int:
        raise RuntimeError("core bug")

    monkeypatch.setattr(cli_module, "cmd_inspect", broken)
    with pytest.raises(RuntimeError, match="core bug"):
        cli("inspect", llama_dir)


def test_bad_index_json(cli: Cli, llama_dir: Path, tmp_path: Path) -> None:
    index = llama_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": ["not", "an", "object"]}))
    assert f'{index}: expected an object with a "weight_map" object' in failed_import(cli, llama_dir, tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_damaged_torch_dist_file_names_it_in_the_offline_export(
    cli: Cli, llama_dir: Path, tmp_path: Path, damage: str
) -> None:
    """The offline export reads the `.distcp` files itself: a short or overwritten one is one line."""
    megatron, out = tmp_path / "megatron", tmp_path / "out"
    assert cli("import", llama_dir, megatron).returncode == 0
    distcp = max((megatron / "release").glob("*.distcp"), key=lambda f: f.stat().st_size)
    data = distcp.read_bytes()
    if damage == "truncate":
        distcp.write_bytes(data[: len(data) // 2])
        expected = "(truncated checkpoint)"
    else:  # the end of the last chunk's torch.save archive: its zip directory
        distcp.write_bytes(data[:-512] + b"\xff" * 512)
        expected = "is not a readable tensor"
    line = cli("export", megatron, out, "--offline").error_line()
    assert str(distcp) in line and expected in line, line
    assert siblings(out) == [], siblings(out)
