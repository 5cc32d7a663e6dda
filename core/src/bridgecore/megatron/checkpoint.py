"""megatron-core distributed checkpoints (torch_dist), in the layout Megatron-LM ``--load`` reads.

    <dir>/latest_checkpointed_iteration.txt   "release"
    <dir>/release/                            the torch_dist files (any TP/PP/EP can load them)
    <dir>/bridgecore.json                     plugin, config.json, source tensor shapes and dtypes
    <dir>/hf/                                 tokenizer and other side files of the HF checkpoint

Like the HF writer, the directory is written under a temporary sibling and renamed into place
only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from bridgecore.errors import BridgeError
from bridgecore.hf.config import copy_side_files
from bridgecore.hf.writer import check_target
from bridgecore.megatron import parallel
from bridgecore.megatron.compat import cpu_compat

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
META = "bridgecore.json"
SIDE = "hf"


def _state_key(index: int, chunks: list[torch.nn.Module]) -> str:
    # Megatron-LM names the model "model", or "model0", "model1", ... with virtual pipeline stages.
    return "model" if len(chunks) == 1 else f"model{index}"


def save_dist(chunks: list[torch.nn.Module], out_dir: Path, meta: dict[str, Any], side_files_from: Path | None,
              overwrite: bool = False) -> None:
    """Save this rank's chunks into ``out_dir`` with every other rank (a collective)."""
    from megatron.core import dist_checkpointing

    parallel.collective(check_target, out_dir, overwrite)
    temp = Path(parallel.broadcast_object(str(out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")))
    try:
        def prepare() -> None:
            if parallel.rank() == 0:
                (temp / RELEASE).mkdir(parents=True)

        parallel.collective(prepare)
        state: dict[str, Any] = {"checkpoint_version": 3.0, "iteration": 0}
        with cpu_compat():
            for i, chunk in enumerate(chunks):
                state[_state_key(i, chunks)] = chunk.sharded_state_dict()
            parallel.collective(dist_checkpointing.save, state, str(temp / RELEASE))

        def finish() -> None:
            if parallel.rank() != 0:
                return
            (temp / TRACKER).write_text(RELEASE)
            (temp / META).write_text(json.dumps(meta, indent=1) + "\n")
            if side_files_from is not None:
                (temp / SIDE).mkdir()
                copy_side_files(side_files_from, temp / SIDE)
            if out_dir.exists():
                aside = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(out_dir, aside)
                os.replace(temp, out_dir)
                shutil.rmtree(aside)
            else:
                os.replace(temp, out_dir)

        parallel.collective(finish)
    except BaseException:
        if parallel.rank() == 0:
            shutil.rmtree(temp, ignore_errors=True)
        raise


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    """The bridgecore record of a Megatron checkpoint, or a one-line error saying what is missing."""
    path = ckpt_dir / META
    if not (ckpt_dir / RELEASE).is_dir() or not path.is_file():
        raise BridgeError(
            f"{ckpt_dir}: not a bridgecore Megatron checkpoint (expected {RELEASE}/ and {META},"
            " as written by `bridgecore import`)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BridgeError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def load_dist(chunks: list[torch.nn.Module], ckpt_dir: Path) -> None:
    """Load a torch_dist checkpoint into this rank's chunks, whatever layout it was saved with."""
    from megatron.core import dist_checkpointing

    state = {_state_key(i, chunks): chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    with cpu_compat():
        loaded = parallel.collective(dist_checkpointing.load, state, str(ckpt_dir / RELEASE))

    def apply() -> None:
        for i, chunk in enumerate(chunks):
            result = chunk.load_state_dict(loaded[_state_key(i, chunks)], strict=False)
            missing = [k for k in result.missing_keys if not k.endswith("._extra_state")]
            if missing:
                raise BridgeError(f"{ckpt_dir}: checkpoint lacks {len(missing)} model tensors, e.g. {missing[0]}")

    parallel.collective(apply)
