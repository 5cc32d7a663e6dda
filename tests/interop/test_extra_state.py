"""Checkpoints written by ``bridgecore import`` load under megatron-core's default strictness into a
model whose modules carry ``_extra_state``, as Transformer-Engine modules do.

Megatron-LM and Megatron-Bridge build Qwen3.5 (and the other families) from Transformer-Engine
modules: the fused norm + linear and the norms carry an ``_extra_state`` (empty without FP8) that
megatron-core asks for on load. Transformer Engine needs CUDA, so the model here is ours with those
two module kinds given Transformer Engine's ``get_extra_state``/``set_extra_state``; megatron-core's
own sharded-state-dict code then asks for exactly the ShardedObjects it asks for in the TE build.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bridgecore import AutoBridge
from bridgecore.cli import main
from bridgecore.megatron import parallel
from bridgecore.megatron.compat import cpu_compat
from bridgecore.megatron.norms import LocalNorm

#: our modules that stand where the TE build has a TE module with ``_extra_state`` of its own
#: (megatron-core's local linears already carry one).
TE_STANDINS = ["LocalNorm", "NormColumnParallelLinear"]


def _empty_extra_state(self: torch.nn.Module) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)  # what Transformer Engine saves without FP8 state


def _accept_extra_state(self: torch.nn.Module, state: object) -> None:
    assert state is None or (isinstance(state, torch.Tensor) and state.numel() == 0), state


def _fused_in_te(chunk: torch.nn.Module) -> set[int]:
    """Norms a local spec keeps apart but saves under a linear's keys (``sharded_state_dict_keys_map``):
    the TE build fuses them into that linear, whose own ``_extra_state`` covers them."""
    fused = set()
    for layer in chunk.modules():
        keys_map = getattr(getattr(layer, "submodules_config", None), "sharded_state_dict_keys_map", None) or {}
        for name in keys_map:
            module = getattr(layer, name.rstrip("."), None)
            if module is not None:
                fused.add(id(module))
    return fused


def _with_extra_state(model: list[torch.nn.Module]) -> int:
    """Give the TE stand-ins Transformer Engine's extra-state methods; returns how many modules changed."""
    changed = 0
    for chunk in model:
        fused = _fused_in_te(chunk)
        for module in chunk.modules():
            if type(module).__name__ in TE_STANDINS and id(module) not in fused:
                extras = {"get_extra_state": _empty_extra_state, "set_extra_state": _accept_extra_state}
                module.__class__ = type(f"TE{type(module).__name__}", (type(module),), extras)
                changed += 1
    return changed


@pytest.mark.parametrize(
    ("name", "expected_key"),
    [
        ("qwen35-dense", "decoder.layers.0.mlp.linear_fc1._extra_state/shard_0_1"),
        pytest.param(
            "step35", "decoder.layers.0.self_attention.q_layernorm._extra_state/shard_0_1", marks=pytest.mark.slow
        ),
    ],
)
@pytest.mark.parametrize("offline", [False, True], ids=["in-memory", "offline"])
def test_import_loads_with_assume_ok_unexpected(tiny_hf, tmp_path: Path, name: str, expected_key: str, offline: bool):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.validation import StrictHandling

    hf, ckpt = tiny_hf(name), tmp_path / "megatron"
    assert main(["import", str(hf), str(ckpt), *(["--offline"] if offline else [])]) == 0
    bridge = AutoBridge.from_hf_pretrained(hf)
    expected = {n: p.detach().clone() for n, p in bridge.to_megatron_model()[0].named_parameters()}
    model = bridge.to_megatron_model(load_weights=False)
    assert _with_extra_state(model) > 0 and LocalNorm.get_extra_state is torch.nn.Module.get_extra_state
    with cpu_compat():
        state = {"model": model[0].sharded_state_dict(metadata={"dp_cp_group": ps.get_data_parallel_group()})}
        asked = {v.unique_key for v in nested_values(state) if isinstance(v, ShardedObject)}
        assert expected_key in asked
        loaded = dist_checkpointing.load(state, str(ckpt / "release"), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    model[0].load_state_dict(loaded["model"], strict=True)
    params = dict(model[0].named_parameters())
    assert params.keys() == expected.keys()
    assert all(torch.equal(params[n], expected[n]) and params[n].dtype == expected[n].dtype for n in expected)
    parallel.leave()
