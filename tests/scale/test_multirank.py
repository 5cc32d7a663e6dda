"""``torchrun -m bridgecore`` at 2 and 4 ranks over TP, PP, EP and their products, bit for bit.

The reference is the single-rank round trip, which is the source checkpoint itself (less what a
model's flags waive); every multi-rank result must equal it bit for bit. A representative matrix
runs by default; ``-m slow`` runs the rest.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from scale_cli import TINY, bridgecore

from bridgecore.compare import compare_checkpoints

slow = pytest.mark.slow

# (tiny model, ranks, layout flags): MoE families carry the EP cases, the dense ones TP and PP.
ROUNDTRIPS = [
    ("llama-example", 2, ["--tp", "2"]),
    ("step35", 4, ["--pp", "2", "--ep", "2"]),
    ("qwen35-moe", 4, ["--tp", "2", "--ep", "2"]),
    ("qwen35-dense", 2, ["--pp", "2"]),
    ("qwen36-moe-vl", 2, ["--ep", "2"]),
    ("step37", 2, ["--ep", "2"]),
    pytest.param("llama-example", 2, ["--pp", "2"], marks=slow),
    pytest.param("llama-example", 4, ["--tp", "2", "--pp", "2"], marks=slow),
    pytest.param("step35", 2, ["--tp", "2"], marks=slow),
    pytest.param("step35", 2, ["--ep", "2"], marks=slow),
    pytest.param("step35", 4, ["--tp", "2", "--ep", "2"], marks=slow),
    pytest.param("step35", 4, ["--tp", "2", "--pp", "2"], marks=slow),
    pytest.param("qwen35-moe", 2, ["--pp", "2"], marks=slow),
    pytest.param("qwen35-moe", 4, ["--pp", "2", "--ep", "2"], marks=slow),
    pytest.param("qwen35-dense", 2, ["--tp", "2"], marks=slow),
    pytest.param("qwen35-dense", 4, ["--tp", "2", "--pp", "2"], marks=slow),
    pytest.param("qwen36-moe-vl", 4, ["--tp", "2", "--ep", "2"], marks=slow),
    pytest.param("step37", 4, ["--tp", "2", "--pp", "2"], marks=slow),
    pytest.param("step37", 4, ["--pp", "2", "--ep", "2"], marks=slow),
]


def _layout_id(value: object) -> str | None:
    return "".join(value).replace("--", "") if isinstance(value, list) else None


@pytest.mark.parametrize(("name", "ranks", "layout"), ROUNDTRIPS, ids=_layout_id)
def test_roundtrip(tiny_checkpoint, single_rank, tmp_path: Path, name: str, ranks: int, layout: list[str]) -> None:
    out = tmp_path / "hf-out"
    bridgecore(
        name,
        "roundtrip",
        tiny_checkpoint(name),
        *layout,
        *TINY[name][1],
        "--keep",
        out,
        ranks=ranks,
        check=not TINY[name][1],
    )
    report = compare_checkpoints(single_rank(name), out)
    assert report.exact, [r for r in report.rows if r.status != "exact"][:5]


# (tiny model, import ranks and flags, export ranks and flags): the torch_dist checkpoint written at
# one layout is read back at another by megatron-core's dist_checkpointing.
CROSS = [
    ("llama-example", 4, ["--tp", "2", "--pp", "2"], 2, ["--tp", "2"]),
    # tied embeddings with MTP on the last stage, whose unused output weight megatron-core refuses to save
    ("qwen35-dense", 2, ["--pp", "2"], 2, ["--tp", "2"]),
    pytest.param("step35", 4, ["--tp", "2", "--ep", "2"], 2, ["--pp", "2"], marks=slow),
    pytest.param("qwen35-moe", 2, ["--ep", "2"], 4, ["--pp", "2", "--ep", "2"], marks=slow),
]


@pytest.mark.parametrize(
    ("name", "import_ranks", "import_layout", "export_ranks", "export_layout"), CROSS, ids=_layout_id
)
def test_import_then_export_at_another_layout(
    tiny_checkpoint,
    tmp_path: Path,
    name: str,
    import_ranks: int,
    import_layout: list[str],
    export_ranks: int,
    export_layout: list[str],
) -> None:
    hf = tiny_checkpoint(name)
    bridgecore(name, "import", hf, tmp_path / "megatron", *import_layout, *TINY[name][1], ranks=import_ranks)
    bridgecore(name, "export", tmp_path / "megatron", tmp_path / "hf-out", *export_layout, ranks=export_ranks)
    report = compare_checkpoints(hf, tmp_path / "hf-out")
    assert report.exact, [r for r in report.rows if r.status != "exact"][:5]
