"""Offline conversion (one process, no model in memory) against the in-memory paths, bit for bit.

``import --offline`` writes a torch_dist checkpoint chunked for a layout; megatron-core must load it
at other layouts (``bridgecore export`` under torchrun) and give what the in-memory import gives.
``export --offline`` must read back what either import wrote, whatever layout saved it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scale_cli import TINY, bridgecore
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from bridgecore import AutoBridge
from bridgecore.compare import compare_checkpoints
from bridgecore.errors import BridgeError
from bridgecore.megatron.dcp import RELEASE
from bridgecore.megatron.parallel import Layout
from bridgecore.offline import stream_to_megatron

# (tiny model, offline import layout flags, in-memory export: ranks and flags)
CASES = [
    ("llama-example", ["--tp", "2"], 2, ["--pp", "2"]),
    pytest.param("step35", ["--pp", "2", "--ep", "2"], 2, ["--tp", "2"], marks=pytest.mark.slow),
    pytest.param("qwen35-moe", ["--tp", "2", "--ep", "2"], 2, ["--pp", "2"], marks=pytest.mark.slow),
    # tied embeddings with MTP on the last stage: megatron-core asserts on its unused output weight
    ("qwen35-dense", ["--pp", "2"], 2, ["--tp", "2"]),
    pytest.param("step37", ["--ep", "2"], 2, ["--ep", "2"], marks=pytest.mark.slow),
]


def _exact(a: Path, b: Path) -> None:
    report = compare_checkpoints(a, b)
    assert report.exact, [r for r in report.rows if r.status != "exact"][:5]


@pytest.mark.parametrize(
    ("name", "layout", "export_ranks", "export_layout"),
    CASES,
    ids=lambda v: "".join(v).replace("--", "") if isinstance(v, list) else None,
)
def test_offline_import_loads_at_other_layouts(
    tiny_checkpoint, tmp_path: Path, name: str, layout: list[str], export_ranks: int, export_layout: list[str]
) -> None:
    hf, extra = tiny_checkpoint(name), TINY[name][1]
    bridgecore(name, "import", hf, tmp_path / "offline", "--offline", *layout, *extra)
    bridgecore(name, "import", hf, tmp_path / "memory", *extra)
    # the in-memory export at a single rank and at another layout, from the offline checkpoint
    bridgecore(name, "export", tmp_path / "offline", tmp_path / "hf-1")
    bridgecore(name, "export", tmp_path / "offline", tmp_path / "hf-n", *export_layout, ranks=export_ranks)
    bridgecore(name, "export", tmp_path / "memory", tmp_path / "hf-memory")
    for out in ("hf-1", "hf-n"):
        _exact(tmp_path / "hf-memory", tmp_path / out)
    # the offline export of both
    bridgecore(name, "export", tmp_path / "offline", tmp_path / "hf-offline", "--offline")
    bridgecore(name, "export", tmp_path / "memory", tmp_path / "hf-offline-memory", "--offline")
    for out in ("hf-offline", "hf-offline-memory"):
        _exact(hf, tmp_path / out)


def test_offline_export_reads_a_multirank_save(tiny_checkpoint, tmp_path: Path) -> None:
    """A checkpoint megatron-core saved from 4 ranks (one file each) streams back to the source."""
    hf = tiny_checkpoint("llama-example")
    bridgecore("llama-example", "import", hf, tmp_path / "megatron", "--tp", "2", "--pp", "2", ranks=4)
    bridgecore("llama-example", "export", tmp_path / "megatron", tmp_path / "hf-out", "--offline")
    _exact(hf, tmp_path / "hf-out")


def _saved(ckpt: Path, scratch: Path) -> dict[str, object]:
    """Every saved tensor and object of a torch_dist checkpoint, by key."""
    out = scratch / f"{ckpt.name}.pt"
    dcp_to_torch_save(ckpt / RELEASE, out)
    return torch.load(out, weights_only=False)


def test_offline_paths_split_across_processes(tiny_checkpoint, tmp_path: Path) -> None:
    """Under torchrun the processes share the offline work: the import saves what one process saves
    (each process its own files), and the export writes the source's own files back."""
    name, layout = "qwen35-moe", ["--tp", "2", "--ep", "2"]
    hf = tiny_checkpoint(name)
    bridgecore(name, "import", hf, tmp_path / "one", "--offline", *layout)
    bridgecore(name, "import", hf, tmp_path / "two", "--offline", *layout, ranks=2)
    assert sorted(p.name for p in (tmp_path / "two" / RELEASE).glob("__*.distcp"))[-1].startswith("__1_")
    one, two = _saved(tmp_path / "one", tmp_path), _saved(tmp_path / "two", tmp_path)
    assert one.keys() == two.keys()
    for key, value in one.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == two[key].dtype and torch.equal(value, two[key]), key
    bridgecore(name, "export", tmp_path / "two", tmp_path / "hf-two", "--offline", ranks=2)
    files = sorted(p.name for p in hf.iterdir())
    assert sorted(p.name for p in (tmp_path / "hf-two").iterdir()) == files
    assert all((hf / f).read_bytes() == (tmp_path / "hf-two" / f).read_bytes() for f in files)


def test_python_api_refuses_an_existing_target_and_leaves_it(tiny_checkpoint, tmp_path: Path) -> None:
    hf = tiny_checkpoint("llama-example")
    bridge = AutoBridge.from_hf_pretrained(hf)
    target = tmp_path / "megatron"
    target.mkdir()
    (target / "keep").write_text("mine")
    with pytest.raises(BridgeError, match="already exists"):
        stream_to_megatron(bridge, target, Layout(tp=2))
    assert [p.name for p in target.iterdir()] == ["keep"]
