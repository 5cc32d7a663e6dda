"""End to end through the ``bridgecore`` command, in subprocesses, with only the named plugins loaded.

- A calibrated checkpoint (amax on every linear, k/v bmm amax) round-trips bit-exact at TP 1 and 2:
  the third-party example Llama (the quant plugin knows nothing of it) and the Step-3.5 tiny
  (q/k/v/g fan-out, stacked experts at EP 1 and 2, MTP).
- ``import`` then ``export --quant fp8|nvfp4``: the quantizer state survives the torch_dist
  checkpoint, and the deployable weights dequantize within the bounds of ``test_formats``.
- A plain checkpoint with the quant plugin loaded converts exactly as without it.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from bridgecore import AutoBridge
from bridgecore.plugins import Plugins
from bridgecore.testing import write_tiny
from bridgecore_quant.formats import exclude_patterns

sys.path.insert(0, str(Path(__file__).parent))
from calibration import calibrate
from test_formats import (
    assert_fp8_within_bound,
    assert_nvfp4_within_bound,
    assert_quant_config,
)

STEP35 = importlib.util.find_spec("bridgecore_step35") is not None


def write_llama(out: Path) -> Path:
    return write_tiny("llama_example", "llama-example", out)


PLUGINS = {
    "llama": "llama_example,quant",
    "step35": "step35,quant",
    "qwen35-moe": "qwen35,quant",
    "qwen35-dense": "qwen35,quant",
    "step37": "step35,step37,quant",
}


def bridgecore(plugins: str, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    env = os.environ | {"BRIDGECORE_PLUGINS": plugins, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *launcher, "-m", "bridgecore", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out |= load_file(file)
    return out


def write_step35(out: Path) -> None:
    if not STEP35:
        pytest.skip("bridgecore-step35 is not installed: no Step-3.5 tiny model to calibrate")
    from bridgecore_step35.tiny import write_tiny

    write_tiny(out)


def write_family_tiny(family: str, out: Path) -> None:
    """The tiny model ``family`` of its installed plugin (qwen35-moe, qwen35-dense, step37)."""
    from bridgecore.plugins import Plugins

    plugins = Plugins()
    found = [t for ts in plugins.call_all("tiny_models") for t in ts or () if t.name == family]
    if not found:
        pytest.skip(f"no installed plugin ships the tiny model {family}")
    found[0].write(out)


@pytest.fixture(scope="module")
def calibrated(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> tuple[str, Path, dict[str, torch.Tensor]]:
    family = request.param
    src = tmp_path_factory.mktemp(family) / "calibrated"
    if family in ("llama", "step35"):
        (write_llama if family == "llama" else write_step35)(src)
    else:
        write_family_tiny(family, src)
    tensors = calibrate(src)
    if family == "step35":
        assert any(k.endswith("moe.gate_proj.weight_quantizer._amax") and v.shape == (4,) for k, v in tensors.items())
    return family, src, tensors


# TP 1 is the Step-3.5 run's; the example Llama runs at TP 2, the harder layout, to keep the suite short.
# Qwen3.5 brings the GDN in_proj fan-out and per-expert MoE amax; Step-3.7 the language_model. prefix.
ROUNDTRIPS = [
    ("llama", 2, 1),
    ("step35", 1, 1),
    ("step35", 2, 2),
    ("qwen35-moe", 2, 2),
    ("qwen35-dense", 2, 1),
    ("step37", 1, 1),
]


@pytest.mark.parametrize(
    ("calibrated", "tp", "ep"),
    ROUNDTRIPS,
    indirect=["calibrated"],
    ids=[f"{f}-tp{tp}-ep{ep}" for f, tp, ep in ROUNDTRIPS],
)
def test_calibrated_checkpoint_roundtrips_bit_exact(calibrated, tp: int, ep: int, tmp_path: Path) -> None:
    family, src, tensors = calibrated
    plugin = ["--plugin", "llama_example"] if family == "llama" else []
    result = bridgecore(
        PLUGINS[family],
        "roundtrip",
        str(src),
        "--tp",
        str(tp),
        "--ep",
        str(ep),
        *plugin,
        "--keep",
        str(tmp_path / "out"),
        nproc=max(tp, ep),
    )
    assert "bit-exact" in result.stdout
    got = load_dir(tmp_path / "out")
    assert sorted(got) == sorted(tensors)
    assert all(torch.equal(got[k], v) for k, v in tensors.items() if k.endswith("_quantizer._amax"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """The calibrated Step-3.5 tiny (or Llama without it) imported at TP 2 into torch_dist."""
    family = "step35" if STEP35 else "llama"
    src = tmp_path_factory.mktemp("quant-export") / "calibrated"
    (write_step35 if STEP35 else write_llama)(src)
    tensors = calibrate(src)
    bridgecore(PLUGINS[family], "import", str(src), str(src.parent / "megatron"), "--tp", "2", nproc=2)
    return src, tensors, json.loads((src / "config.json").read_text())


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_import_then_quantized_export(imported, fmt: str, tmp_path: Path) -> None:
    src, source, config = imported
    megatron = src.parent / "megatron"
    saved = FileSystemReader(str(megatron / "release")).read_metadata().state_dict_metadata
    assert any(k.endswith("linear_qkv.weight_quantizer._amax") for k in saved)
    assert any(k.endswith("core_attention.k_bmm_quantizer._amax") for k in saved)
    family = "step35" if STEP35 else "llama"
    bridgecore(PLUGINS[family], "export", str(megatron), str(tmp_path / fmt), "--quant", fmt)
    got = load_dir(tmp_path / fmt)
    modules = sorted(k.removesuffix(".weight_quantizer._amax") for k in source if k.endswith(".weight_quantizer._amax"))
    (assert_fp8_within_bound if fmt == "fp8" else assert_nvfp4_within_bound)(got, source, modules)
    for name in (k for k in source if k.endswith("k_bmm_quantizer._amax")):
        attn = name.removesuffix(".k_bmm_quantizer._amax")
        assert torch.equal(got[f"{attn}.k_proj.k_scale"], source[name] / 448)
    matmuls = {k.removesuffix(".weight") for k, v in source.items() if k.endswith(".weight") and v.dim() >= 2}
    exclude = exclude_patterns(matmuls - set(modules), set(modules))
    assert "model.layers.0.input_layernorm" not in exclude
    assert not any(fnmatch.fnmatchcase(m, e) for e in exclude for m in modules)
    assert_quant_config(tmp_path / fmt, fmt, exclude, True, config)
    unquantized = [k for k in source if "_quantizer." not in k and k.removesuffix(".weight") not in modules]
    assert all(torch.equal(got[k], source[k]) for k in unquantized)


def test_plain_checkpoint_is_unchanged_by_the_quant_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_llama(tmp_path / "plain")
    source = load_dir(tmp_path / "plain")
    bridgecore(PLUGINS["llama"], "roundtrip", str(tmp_path / "plain"), "--keep", str(tmp_path / "out"))
    got = load_dir(tmp_path / "out")
    assert sorted(got) == sorted(source) and all(torch.equal(got[k], v) for k, v in source.items())
    monkeypatch.setenv("BRIDGECORE_PLUGINS", PLUGINS["llama"])
    # its own manager: the process-wide one (`installed()`, loaded once) would keep the restriction
    # for every later test of this process, or ignore it if an earlier test loaded it
    bridge = AutoBridge.from_hf_pretrained(tmp_path / "plain", plugins=Plugins())
    assert "quant" in bridge.plugins.infos
    model = bridge.to_megatron_model(load_weights=False, meta=True)
    assert not [n for chunk in model for n, _ in chunk.named_modules() if n.endswith("_quantizer")]
