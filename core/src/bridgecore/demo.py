"""``bridgecore demo``: every installed family's tiny model through the full path, as a table.

generate (released on-disk layout) -> import (torch_dist) -> export (from torch_dist) -> compare.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bridgecore.compare import compare_checkpoints
from bridgecore.errors import BridgeError
from bridgecore.hf.writer import check_target
from bridgecore.memory import AutoBridge
from bridgecore.plugins import installed
from bridgecore.tiny import TinyModel


def run_demo(out: Path | None, only: Sequence[str] | None = None, overwrite: bool = False) -> int:
    plugins = installed()
    tiny = [t for found in plugins.call_all("tiny_models") for t in (found or [])]
    if only:
        unknown = set(only) - {t.name for t in tiny}
        if unknown:
            raise BridgeError(
                f"--only {', '.join(sorted(unknown))}: no such tiny model; have {', '.join(t.name for t in tiny)}"
            )
        tiny = [t for t in tiny if t.name in only]
    if not tiny:
        raise BridgeError(f"no installed plugin ships a tiny model; installed: {plugins.summary()}")
    if out is not None:
        for model in tiny:
            check_target(out / model.name, overwrite)
    base = out or Path(tempfile.mkdtemp(prefix="bridgecore-demo-"))
    try:
        rows = [_convert(model, base / model.name) for model in tiny]
    finally:
        if out is None:
            shutil.rmtree(base, ignore_errors=True)
    print(
        f"\n{'tiny model':18s} {'plugin':14s} {'HF tensors':>10s} {'params':>10s}"
        f" {'import s':>9s} {'export s':>9s}  round trip"
    )
    for name, plugin, tensors, params, t_import, t_export, report in rows:
        verdict = "bit-exact" if report.exact else f"{sum(r.status != 'exact' for r in report.rows)} tensors differ"
        print(f"{name:18s} {plugin:14s} {tensors:10d} {params:10,d} {t_import:9.2f} {t_export:9.2f}  {verdict}")
    print(f"\ncheckpoints kept in {base}" if out else "\ncheckpoints removed; pass --out DIR to keep them")
    return 0 if all(r[-1].exact for r in rows) else 1


def _convert(model: TinyModel, work: Path) -> tuple:
    """Write ``model``'s tiny checkpoint under ``work``, import, export, compare: one table row."""
    shutil.rmtree(work, ignore_errors=True)
    print(f"[{model.name}] {model.description}", flush=True)
    model.write(work / "hf")
    start = time.perf_counter()
    bridge = AutoBridge.from_hf_pretrained(work / "hf")
    megatron = bridge.to_megatron_model()
    bridge.save_megatron(megatron, work / "megatron")
    imported = time.perf_counter()
    back = AutoBridge.from_megatron_checkpoint(work / "megatron")
    chunks = back.to_megatron_model(load_weights=False)
    back.load_megatron(chunks, work / "megatron")
    back.save_hf_pretrained(chunks, work / "hf-out")
    exported = time.perf_counter()
    report = compare_checkpoints(work / "hf", work / "hf-out")
    params = sum(t.numel() for c in megatron for t in c.parameters())
    return model.name, bridge.plugin.name, len(report.rows), params, imported - start, exported - imported, report
