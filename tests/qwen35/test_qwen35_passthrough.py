"""The VL checkpoint's vision tower, which the plugin keeps verbatim (its ``passthrough`` hook).

Every path keeps it: ``inspect`` reports it as passthrough (never as an ``--allow-unmapped`` waiver
nobody gave), and the offline import writes ``passthrough/`` as the in-memory one does, so the
offline export gives back the source's files byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from cli_runner import run_cli

PLUGINS = "qwen35"


def test_inspect_says_passthrough_for_the_vision_tower(checkpoints: dict[str, Path]) -> None:
    result = run_cli("inspect", str(checkpoints["moe-vl"]), plugins=PLUGINS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--allow-unmapped" not in result.stdout
    assert "passthrough: plugin qwen35 keeps 21 HF tensors verbatim, not converted: model.visual." in result.stdout
    assert "kept verbatim (passthrough)" in result.stdout


def test_offline_import_and_export_keep_the_vision_tower(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    hf, megatron, out = checkpoints["moe-vl"], tmp_path / "megatron", tmp_path / "out"
    result = run_cli("import", str(hf), str(megatron), "--offline", "--tp", "2", plugins=PLUGINS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "passthrough: plugin qwen35 keeps 21" in result.stdout
    assert sorted(p.name for p in (megatron / "passthrough").iterdir()) == ["model.safetensors"]
    result = run_cli("export", str(megatron), str(out), "--offline", plugins=PLUGINS)
    assert result.returncode == 0, result.stderr[-2000:]
    weights = lambda d: {p.name: p.read_bytes() for p in sorted(d.glob("model*"))}  # noqa: E731
    assert weights(out) == weights(hf)
