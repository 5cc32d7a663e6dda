"""The standard checks a plugin runs on its own tiny models, from its own tests.

Every plugin gets the same conformance suite with a few lines of pytest::

    import pytest
    from bridgecore.testing import check_tiny_model, tiny_model_names

    @pytest.mark.parametrize("name", tiny_model_names("myfamily"))
    def test_conformance(name, tmp_path):
        check_tiny_model("myfamily", name, tmp_path)

Each check runs the ``bridgecore`` command as a user does, in a child process with only that
plugin loaded (``BRIDGECORE_PLUGINS``), multi-rank layouts under ``torchrun`` on gloo (CPU):

- ``roundtrip`` (HF -> Megatron -> HF) must be bit-exact; it also checks strict coverage (every HF
  tensor and every Megatron param mapped, nothing waived) and every dtype cast;
- ``verify``: Megatron's logits against the plugin's transformers reference, at ``verify``'s own
  default tolerance.

:func:`check_mapping` unit-tests one mapping in memory (no model, no files): import at every TP
rank from a :class:`bridgecore.mapping.TensorSource`, then export, must give the tensors back bit for
bit, each rank reading no more than its shard. The core's property tests run it on every mapping
type over random shapes; a plugin can do the same for its own tables.

The default is cheap (single rank and verify: two processes, seconds for a tiny model); pass
``layouts=ALL_LAYOUTS`` (TP1, TP2, EP2, PP2) for the multi-rank matrix, e.g. in a slow test. EP2
runs only for models with experts. A failed check raises ``AssertionError`` with the command's
output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from bridgecore.mapping import Mapping, Shard, TensorSource
from bridgecore.plugins import PluginInfo, Plugins
from bridgecore.tiny import TinyModel

#: layout name -> (bridgecore flags, ranks)
LAYOUTS: dict[str, tuple[tuple[str, ...], int]] = {
    "tp1": ((), 1),
    "tp2": (("--tp", "2"), 2),
    "ep2": (("--ep", "2"), 2),
    "pp2": (("--pp", "2"), 2),
}
DEFAULT_LAYOUTS = ("tp1",)
ALL_LAYOUTS = tuple(LAYOUTS)


def _plugin(plugin: str) -> tuple[Plugins, PluginInfo]:
    """``plugin`` among the installed plugins, looked up afresh (it may have been installed just now)."""
    plugins = Plugins()
    if plugin not in plugins.infos:
        raise AssertionError(f"plugin {plugin} is not installed; installed: {plugins.summary()}")
    return plugins, plugins.infos[plugin]


def tiny_models(plugin: str) -> list[TinyModel]:
    """The tiny models of the installed plugin ``plugin`` (its own, or the core's default ones)."""
    plugins, info = _plugin(plugin)
    found = list(plugins.call_owned("tiny_models", info) or []) if "tiny_models" in info.hooks + info.defaults else []
    if not found:
        raise AssertionError(f"plugin {plugin} ships no tiny model (tiny_models, or transformers_models with a config)")
    return found


def tiny_model_names(plugin: str) -> list[str]:
    """The names of ``plugin``'s tiny models, for ``pytest.mark.parametrize``."""
    return [t.name for t in tiny_models(plugin)]


def write_tiny(plugin: str, name: str, out: Path) -> Path:
    """Write ``plugin``'s tiny model ``name`` into ``out`` (created) and return ``out``."""
    found = [t for t in tiny_models(plugin) if t.name == name]
    if not found:
        raise AssertionError(f"plugin {plugin} has no tiny model {name!r}; it has {tiny_model_names(plugin)}")
    found[0].write(Path(out))
    return Path(out)


def run_bridgecore(
    *args: str | Path, plugin: str | None = None, ranks: int = 1, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``bridgecore ARGS`` in a child process (``torchrun`` on gloo for ``ranks`` > 1), output captured.

    ``plugin`` restricts the loaded plugins to that one. The child inherits this environment, so a
    plugin installed on ``PYTHONPATH`` is found there too.
    """
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    if plugin is not None:
        env["BRIDGECORE_PLUGINS"] = plugin
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    command = [*launcher, "-m", "bridgecore", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def _require(done: subprocess.CompletedProcess, what: str) -> str:
    if done.returncode != 0:
        raise AssertionError(f"{what} failed (exit {done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def check_roundtrip(hf_dir: Path, layout: str = "tp1", plugin: str | None = None) -> str:
    """HF -> Megatron -> HF at ``layout`` (a key of :data:`LAYOUTS`) is bit-exact; returns the report."""
    flags, ranks = LAYOUTS[layout]
    done = run_bridgecore("roundtrip", hf_dir, *flags, plugin=plugin, ranks=ranks)
    return _require(done, f"bridgecore roundtrip {hf_dir} {' '.join(flags)}".rstrip())


def check_verify(hf_dir: Path, plugin: str | None = None) -> str:
    """Megatron's logits match the plugin's transformers reference; returns verify's line.

    Its exit status and its own figures must both say so: the relative difference it prints is read
    back and held to the tolerance it prints, so a verify that exits 0 on a failing case fails here."""
    out = _require(run_bridgecore("verify", hf_dir, plugin=plugin), f"bridgecore verify {hf_dir}")
    found = re.search(r"relative (\S+), tolerance (\S+);", out)
    if found is None:
        raise AssertionError(f"bridgecore verify {hf_dir} printed no relative difference:\n{out[-4000:]}")
    relative, tolerance = (float(value) for value in found.groups())
    if not relative <= tolerance:  # NaN fails too
        raise AssertionError(f"bridgecore verify {hf_dir} exited 0 at relative {relative} > {tolerance}")
    return out


def has_experts(hf_dir: Path, plugin: str) -> bool:
    """Whether the plugin's Megatron config of ``hf_dir`` has MoE experts (EP splits nothing otherwise)."""
    from bridgecore.memory import AutoBridge

    plugins, _ = _plugin(plugin)
    bridge = AutoBridge.from_hf_pretrained(hf_dir, plugin=plugin, plugins=plugins, weights=False)
    return bool(bridge.config.num_moe_experts)


def check_tiny_model(
    plugin: str, name: str, work: Path, layouts: Sequence[str] = DEFAULT_LAYOUTS, verify: bool = True
) -> dict[str, str]:
    """The conformance suite on one tiny model: round trips at ``layouts``, then ``verify``.

    Writes the tiny model under ``work``; returns each check's output by name (``roundtrip tp1``,
    ``verify``), for a test to show or assert more on.
    """
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        raise ValueError(f"unknown layouts {sorted(unknown)}; known: {list(LAYOUTS)}")
    hf_dir = write_tiny(plugin, name, Path(work) / name)
    results = {}
    for layout in layouts:
        if layout == "ep2" and not has_experts(hf_dir, plugin):
            continue
        results[f"roundtrip {layout}"] = check_roundtrip(hf_dir, layout, plugin)
    if verify:
        results["verify"] = check_verify(hf_dir, plugin)
    return results


def check_mapping(mapping: Mapping, tensors: dict[str, torch.Tensor], captures: dict[str, int], tp: int) -> list:
    """Import ``tensors`` through ``mapping`` at each of ``tp`` ranks, export back, compare bit for bit.

    ``captures`` fills the patterns' ``{layer}``/``{expert}``/... fields. Returns the Megatron shards
    (rank order); raises ``AssertionError`` naming the tensor that did not come back.
    """
    source = TensorSource(tensors)
    shards = []
    for rank in range(tp):
        before = source.elements_read
        shard = mapping.to_megatron(source, captures, Shard(rank, tp))
        assert source.elements_read - before <= shard.numel(), f"{mapping!r}: import read more than rank {rank}'s shard"
        shards.append(shard)
    assert len({tuple(s.shape) for s in shards}) == 1, f"{mapping!r}: ranks got shards of different shapes"
    pieces = mapping.to_hf(shards, captures)
    assert {p.name for p in pieces} == set(mapping.hf_names(captures)), f"{mapping!r}: export made other tensors"
    for piece in pieces:
        expected = tensors[piece.name] if piece.expert is None else tensors[piece.name][piece.expert]
        assert piece.tensor.dtype == expected.dtype, f"{piece.name}: dtype {piece.tensor.dtype}, not {expected.dtype}"
        same = torch.equal(*(t.reshape(-1).contiguous().view(torch.uint8) for t in (piece.tensor, expected)))
        assert same, f"{piece.name}: export(import(x)) differs from x"
    return shards
