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


def side_files(src_dir: Path) -> list[Path]:
    """The files of `src_dir` that `copy_side_files` copies: never code, never weights."""
    return sorted(
        path
        for path in Path(src_dir).iterdir()
        if path.is_file() and path.name.endswith(SIDE_FILE_SUFFIXES) and not path.name.endswith(WEIGHT_INDEX_SUFFIX)
    )


def copy_side_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy config, generation config, tokenizer and processor files; returns the names copied."""
    copied = []
    for path in side_files(src_dir):
        # copyfile follows symlinks, so a Hugging Face cache snapshot yields real files.
        shutil.copyfile(path, Path(dst_dir) / path.name)
        copied.append(path.name)
    return copied
