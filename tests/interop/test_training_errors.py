"""Training checkpoints through the Python API and the CLI: iteration choice, weights-only reads, and
the one-line refusals (wrong config, missing iteration, no model weights, unknown key layout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from interop_support import save_in_process

from bridgecore import AutoBridge
from bridgecore.cli import main
from bridgecore.compare import compare_checkpoints
from bridgecore.megatron import parallel
from bridgecore.megatron.dcp import read_dcp_metadata

MODES = [pytest.param([], id="in-memory"), pytest.param(["--offline"], id="offline")]


def _params(model: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for chunk in model for n, p in chunk.named_parameters()}


def test_load_megatron_reads_the_chosen_iteration(tiny_hf, llama_trained: Path) -> None:
    """Iteration 100 holds other weights than the tracker's 200: the one asked for is loaded."""
    expected = {}
    try:
        for name in ("llama-example-doubled", "llama-example"):
            bridge = AutoBridge.from_hf_pretrained(tiny_hf(name), params_dtype=torch.float32)
            expected[name] = _params(bridge.to_megatron_model())
        model = bridge.to_megatron_model(load_weights=False)
        loaded = {}
        for iteration in (100, None):
            for chunk in model:
                for p in chunk.parameters():
                    p.data.zero_()
            bridge.load_megatron(model, llama_trained, iteration=iteration)
            loaded[iteration] = _params(model)
    finally:
        parallel.leave()
    for iteration, name in ((100, "llama-example-doubled"), (None, "llama-example")):
        assert loaded[iteration].keys() == expected[name].keys()
        assert all(torch.equal(loaded[iteration][n], expected[name][n]) for n in expected[name]), iteration
    assert not torch.equal(
        loaded[100]["decoder.final_layernorm.weight"], loaded[None]["decoder.final_layernorm.weight"]
    )


def _garble_training_state(iteration_dir: Path) -> int:
    """Overwrite the bytes of every saved optimizer and RNG chunk; returns how many were hit."""
    metadata = read_dcp_metadata(iteration_dir)
    hit = 0
    for index, info in metadata.storage_data.items():
        if index.fqn.startswith(("optimizer.", "rng_state")):
            with open(iteration_dir / info.relative_path, "r+b") as file:
                file.seek(info.offset)
                file.write(b"\xff" * info.length)
            hit += 1
    return hit


@pytest.mark.parametrize("mode", MODES)
def test_only_model_weights_are_read(tiny_hf, llama_trained: Path, tmp_path: Path, mode: list[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(llama_trained, run)
    assert _garble_training_state(run / "iter_0000200") > 0
    hf = tiny_hf("llama-example")
    out = tmp_path / "out"
    assert main(["export", str(run), str(out), "--hf-config", str(hf), *mode]) == 0
    assert compare_checkpoints(hf, out).exact


@pytest.fixture(scope="module")
def broken(tiny_hf, llama_trained: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[str], str]]:
    """case -> (export arguments, the start of the one error line expected)."""
    root = tmp_path_factory.mktemp("broken")
    hf = tiny_hf("llama-example")
    resized = root / "resized"
    resized.mkdir()
    config = json.loads((hf / "config.json").read_text())
    (resized / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    no_model = save_in_process(hf, root / "no-model", 100, with_model=False)
    nested = save_in_process(hf, root / "nested", 100, model_prefix="language_model.")
    run = str(llama_trained)
    return {
        "other-model": ([run, "--hf-config", str(tiny_hf("qwen35-dense"))], "args.num_layers is 2 in the checkpoint"),
        "other-sizes": ([run, "--hf-config", str(resized)], "args.ffn_hidden_size is"),
        "missing-iteration": ([run, "--hf-config", str(hf), "--iteration", "7"], "no iteration 7"),
        "no-model-weights": ([str(no_model), "--hf-config", str(hf)], "holds no model weights"),
        "unknown-key-layout": ([str(nested), "--hf-config", str(hf)], "unknown key layout"),
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "case", ["other-model", "other-sizes", "missing-iteration", "no-model-weights", "unknown-key-layout"]
)
def test_refusals_are_one_line_and_write_nothing(broken, tmp_path: Path, capsys, case: str, mode: list[str]) -> None:
    source, *options = broken[case][0]
    out = tmp_path / "out"
    assert main(["export", source, str(out), *options, *mode]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bridgecore: error: "), lines
    assert broken[case][1] in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))
