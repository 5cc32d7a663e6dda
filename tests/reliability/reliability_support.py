"""Helpers for the reliability tests: the CLI in-process and as a subprocess, checkpoint edits."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from bridgecore.tiny import write_checkpoint

EXAMPLE = "llama_example"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def error_line(self) -> str:
        """The one `bridgecore: error:` line, after checking the run failed with exactly that and no traceback."""
        assert self.returncode == 2, (self.returncode, self.stdout[-2000:], self.stderr[-2000:])
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        errors = [line for line in self.stderr.splitlines() if line.startswith("bridgecore: error:")]
        assert len(errors) == 1, self.stderr[-3000:]
        return errors[0]


@contextlib.contextmanager
def plugins_only(names: str) -> Iterator[None]:
    """Load only these plugins in this process (the plugin set is cached per process)."""
    from bridgecore.plugins import installed

    before = os.environ.get("BRIDGECORE_PLUGINS")
    os.environ["BRIDGECORE_PLUGINS"] = names
    installed.cache_clear()
    try:
        yield
    finally:
        if before is None:
            del os.environ["BRIDGECORE_PLUGINS"]
        else:
            os.environ["BRIDGECORE_PLUGINS"] = before
        installed.cache_clear()


def cli_process(*args: object, plugins: str = EXAMPLE, prelude: str = "", **popen: object) -> subprocess.Popen:
    """The real CLI in a child process; `prelude` is Python run first (to slow a step down for a kill test)."""
    env = dict(os.environ, BRIDGECORE_PLUGINS=plugins, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    code = f"{prelude}\nfrom bridgecore.cli import main\nraise SystemExit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )


def run_process(*args: object, timeout: int = 300, **kwargs: object) -> Result:
    proc = cli_process(*args, **kwargs)
    out, err = proc.communicate(timeout=timeout)
    return Result(proc.returncode, out, err)


def tensors_of(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    return {name: t for file in files for name, t in load_file(hf_dir / file).items()}


def rewrite(hf_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Rewrite the checkpoint in `hf_dir` with `edit` applied to its tensors (a tiny checkpoint)."""
    tensors = tensors_of(hf_dir)
    edit(tensors)
    config = json.loads((hf_dir / "config.json").read_text())
    for path in hf_dir.glob("model*.safetensors*"):
        path.unlink()
    write_checkpoint(hf_dir, config, tensors, shards=2)
    return hf_dir


def edit_config(hf_dir: Path, **changes: object) -> Path:
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return hf_dir


def siblings(path: Path) -> list[str]:
    """Everything next to `path` whose name starts with its name or is a hidden temporary of it."""
    return sorted(p.name for p in path.parent.iterdir() if p.name == path.name or p.name.startswith(f".{path.name}."))
