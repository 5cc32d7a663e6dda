"""config.json as plain data, and the non-weight files that travel with a converted checkpoint.

`config.json` is parsed as JSON and nothing else: an `auto_map` pointing at custom code is ignored,
and no Python file of the checkpoint is ever imported, executed or copied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bridgecore.errors import BridgeError

CONFIG_FILE = "config.json"
#: Non-weight files worth carrying over: configs, tokenizers, processors, chat templates.
SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
#: Weight indexes describe the source's shards, not the converted ones.
WEIGHT_INDEX_SUFFIX = ".index.json"


def read_config(hf_dir: Path) -> dict:
    """The parsed `config.json` of `hf_dir`."""
    hf_dir = Path(hf_dir)
    path = hf_dir / CONFIG_FILE
    if not hf_dir.is_dir():
        raise BridgeError(f"{hf_dir}: not a directory; expected a Hugging Face checkpoint directory")
    if not path.is_file():
        raise BridgeError(f"{hf_dir}: has no {CONFIG_FILE}; expected the model config next to the weights")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BridgeError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BridgeError(f"{path}: cannot be read as UTF-8 text ({err})") from None
    if not isinstance(config, dict):
        raise BridgeError(f"{path}: top level is a JSON {type(config).__name__}; expected an object")
    architectures = config.get("architectures", [])
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise BridgeError(f'{path}: "architectures" is {json.dumps(architectures)[:80]}; expected a list of strings')
    return config


def allowed_roots(hf_dir: Path) -> list[Path]:
    """Where the files of checkpoint ``hf_dir`` may really lie: the directory itself, plus the blob
    store when it is a Hugging Face cache snapshot, whose files are symlinks to ``../../blobs/<hash>``."""
    real_dir = Path(hf_dir).resolve()
    roots = [real_dir]
    if real_dir.parent.name == "snapshots":
        roots.append(real_dir.parent.parent / "blobs")
    return roots


def leaves_checkpoint(hf_dir: Path, path: Path) -> Path | None:
    """Where ``path`` (a file of ``hf_dir``) really is, when a symlink takes it outside the checkpoint;
    None when it stays inside (see :func:`allowed_roots`)."""
    real = Path(path).resolve()
    return None if any(real.is_relative_to(root) for root in allowed_roots(hf_dir)) else real


def side_files(src_dir: Path) -> list[Path]:
    """The files of `src_dir` that `copy_side_files` copies: never code, never weights. A symlink that
    leads outside the checkpoint is refused, as for shards: copying it would put any readable file of
    this machine into an output that may be published."""
    found = sorted(
        path
        for path in Path(src_dir).iterdir()
        if path.is_file() and path.name.endswith(SIDE_FILE_SUFFIXES) and not path.name.endswith(WEIGHT_INDEX_SUFFIX)
    )
    for path in found:
        real = leaves_checkpoint(src_dir, path)
        if real is not None:
            raise BridgeError(
                f"{path}: is a symlink to {real}, outside the checkpoint directory; expected side files"
                " (config, tokenizer, templates) inside it"
            )
    return found


def copy_side_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy config, generation config, tokenizer and processor files; returns the names copied."""
    copied = []
    for path in side_files(src_dir):
        # copyfile follows symlinks, so a Hugging Face cache snapshot yields real files.
        shutil.copyfile(path, Path(dst_dir) / path.name)
        copied.append(path.name)
    return copied
