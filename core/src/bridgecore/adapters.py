"""The adapter executor: LoRA adapters between Megatron checkpoints and PEFT directories, offline.

Neither direction builds a model with memory or reads a base weight: the base HF directory gives
the config and the mappings (through the plugin, as for any conversion), megatron-core's own
sharded state dict of a meta model with Megatron-Bridge's adapters on it
(:mod:`bridgecore.megatron.adapters`) says where each adapter weight lies in a torch_dist save,
and the adapter plan (:mod:`bridgecore.plan.adapters`) maps them.

- export reads every rank's adapter shards at the tensor-parallel sizes the checkpoint was saved
  with (read off the saved chunks: a fused linear's adapter is cut by rank, as the model held it),
  maps them with the LoRA mappings and writes a PEFT directory.
- import makes each rank's adapter shards of the target layout from the PEFT tensors and saves the
  adapter weights alone as a torch_dist checkpoint, chunked as that layout's ranks save them, with
  ``adapter.json`` beside it (each linear's rank and alpha, which the weights do not hold).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bridgecore.errors import BridgeError
from bridgecore.hf.peft import PeftAdapter, read_peft, write_peft
from bridgecore.hf.writer import DEFAULT_MAX_SHARD_SIZE, ShardedWriter, check_target, move_into_place
from bridgecore.megatron import checkpoint, training
from bridgecore.megatron.adapters import LINEAR_IN, LINEAR_OUT, MAGNITUDE, Adapted, adapt, adapted_module, split_dim
from bridgecore.megatron.chunks import main_chunks, simulated_rank
from bridgecore.megatron.dcp import COMMON_FILE, COMMON_STATE, RELEASE, TRACKER, SavedChunks, common_in_shards
from bridgecore.megatron.parallel import Layout
from bridgecore.megatron.params import LocalTensor, local_tensors
from bridgecore.megatron.save import file_writer
from bridgecore.plan.adapters import AdapterPlan
from bridgecore.plan.bridge import Bridge
from bridgecore.progress import track

#: beside an adapter checkpoint: per adapted linear its rank and alpha, the base and the layout.
RECORD = "adapter.json"


def _linears(chunks: list[torch.nn.Module], config: Any) -> dict[str, tuple[int, str]]:
    """This rank's linears that can carry an adapter: global module name -> (chunk, local module name)."""
    modules = [dict(chunk.named_modules()) for chunk in chunks]
    out = {}
    for t in local_tensors(chunks, config):
        local = t.local_name.removesuffix(".weight")
        module = modules[t.chunk].get(local)
        if t.name.endswith(".weight") and module is not None and split_dim(module) is not None:
            out[t.name.removesuffix(".weight")] = (t.chunk, local)
    return out


def _adapter_views(
    chunks: list[torch.nn.Module], config: Any, key_layout: dict[str, Any] | None = None
) -> list[tuple[Any, LocalTensor, Any]]:
    """(saved chunk, param, region) of every adapter weight of this rank that it saves."""
    _, views, _ = main_chunks(chunks, local_tensors(chunks, config), key_layout)
    return [v for v in views if adapted_module(v[1].name) is not None]


def read_record(ckpt_dir: Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / RECORD
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BridgeError(f"{path}: not JSON ({err})") from None


# -- Megatron -> PEFT ----------------------------------------------------------------------------------
def export_adapter(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    base: str | Path,
    *,
    alpha: float | None = None,
    iteration: int | None = None,
    plugin: str | None = None,
    merge: bool = False,
    exclude: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    """Write the LoRA adapter of the Megatron checkpoint ``ckpt_dir`` as a PEFT directory for the HF
    model ``base``, or with ``merge`` the base checkpoint with the adapter merged into its weights.
    Each linear's alpha comes from ``adapter.json`` beside the checkpoint, else from ``alpha``
    (Megatron-Bridge keeps it in its run config, as ``peft.alpha``). The adapters of linears whose
    Megatron module name matches a glob of ``exclude`` (e.g. ``mtp.*``) are left out, unread."""
    out_dir = Path(out_dir)
    check_target(out_dir, overwrite)
    bridge = Bridge.from_hf_pretrained(base, plugin=plugin)
    plan = AdapterPlan.of(bridge)
    release = training.torch_dist_dir(ckpt_dir, iteration)
    metadata = training.saved_metadata(release)
    saved_keys = {k: v for k, v in metadata.state_dict_metadata.items() if adapted_module(k) is not None}
    if not saved_keys:
        raise BridgeError(f"{release}: holds no LoRA adapter weights (<linear>.adapter.linear_in.weight / linear_out)")
    record = read_record(Path(ckpt_dir)).get("modules", {})

    # which linears carry an adapter, and under which of megatron-core's key layouts it was saved
    with simulated_rank(0, 1, Layout()):
        chunks = bridge.build_chunks(Layout(), meta=True)
        linears = _linears(chunks, bridge.config)
        adapt(chunks, [(local, Adapted(m, 1, 1.0, dora=True)) for m, local in linears.items()])
        fits = [_adapter_views(chunks, bridge.config, flags) for flags in training.KEY_LAYOUTS]
    hits = [sum(item.key in saved_keys for item, _, _ in views) for views in fits]
    key_layout = training.KEY_LAYOUTS[hits.index(max(hits))]
    views = fits[hits.index(max(hits))]
    claimed = {item.key for item, _, _ in views}
    strays = sorted(k for k in saved_keys if k not in claimed)
    if strays:
        raise BridgeError(
            f"{release}: {strays[0]}{f' (and {len(strays) - 1} more)' if len(strays) > 1 else ''} is the adapter"
            f" of no linear of the base model {base}"
        )
    adapted: dict[str, Adapted] = {}
    splits = {False: 1, True: 1}
    for item, param, _ in views:
        module, which = adapted_module(param.name)  # type: ignore[misc]
        if which != "in" or item.key not in saved_keys or any(fnmatch.fnmatchcase(module, g) for g in exclude):
            continue
        if plan.bindings(module) is None:
            raise BridgeError(f"{module}: the checkpoint holds a LoRA adapter of it, but {plan.why_not(module)}")
        size = tuple(saved_keys[item.key].size)
        dora = item.key.replace(LINEAR_IN, MAGNITUDE) in saved_keys
        adapted[module] = Adapted(module, size[-2], _alpha(record, module, alpha, ckpt_dir), dora)
        axis = len(size) - (2 if plan.table.find(param.name).mapping.partition_dim == 0 else 1)
        offsets = {c.offsets[axis] for c in saved_keys[item.key].chunks}
        splits[param.expert] = max(splits[param.expert], len(offsets))

    layout = Layout(tp=splits[False], etp=splits[True])
    bridge.plan_conversion(layout)
    shards: dict[str, dict[int, torch.Tensor]] = {}
    saved = SavedChunks(release, metadata)
    world = math.lcm(layout.tp, layout.etp)
    try:
        for rank in range(world):
            with simulated_rank(rank, world, layout):
                chunks = bridge.build_chunks(layout, meta=True)
                linears = _linears(chunks, bridge.config)
                adapt(chunks, [(linears[m], a) for m, a in adapted.items() if m in linears])
                views = _adapter_views(chunks, bridge.config, key_layout)
            regions: dict[tuple[str, int], tuple[LocalTensor, list[Any]]] = {}
            for item, param, region in views:
                regions.setdefault((param.name, param.shard.rank), (param, []))[1].append((item, region))
            for (name, shard), (param, found) in regions.items():
                if shard in shards.get(name, {}):
                    continue
                dtype = saved_keys[found[0][0].key].properties.dtype
                value = torch.empty(param.tensor.shape, dtype=dtype)
                saved.read_param(name, found, value)
                shards.setdefault(name, {})[shard] = value
    finally:
        saved.close()
    if not adapted:
        raise BridgeError(f"{release}: --exclude {' '.join(exclude)} leaves no adapter to export")
    entries = {}
    for module, a in adapted.items():
        weights = {"A": LINEAR_IN, "B": LINEAR_OUT, **({"M": MAGNITUDE} if a.dora else {})}
        entries[module] = (a, {k: _in_order(shards, f"{module}.{suffix}") for k, suffix in weights.items()})
    peft = plan.to_peft(entries, str(base))
    if merge:
        return merge_into(bridge, peft, out_dir, overwrite)
    return write_peft(out_dir, peft, overwrite)


def merge_into(bridge: Bridge, adapter: PeftAdapter, out_dir: Path, overwrite: bool = False) -> Path:
    """The base checkpoint of ``bridge`` with each adapted weight W replaced by W + scale * B @ A
    (DoRA: each row of that rescaled to its magnitude; computed in fp32, cast to W's dtype), one tensor
    in memory at a time, in the base's own files,
    order and index, its side files (config, tokenizer) copied."""
    source, reader = bridge.source, bridge.reader
    if source is None or reader is None:
        raise BridgeError("merging an adapter needs the base model's weights")
    names = list(source.tensors)
    missing = sorted(m for m in adapter.a if f"{m}.weight" not in source.tensors)
    if missing:
        raise BridgeError(f"adapter module {missing[0]}: the base checkpoint has no {missing[0]}.weight to merge into")
    writer = ShardedWriter(
        out_dir,
        [(n, *source.tensors[n]) for n in names],
        DEFAULT_MAX_SHARD_SIZE,
        source.files_of(names),
        source.index_metadata,
    )
    writer.create()
    try:
        for name in track(names, "merge", "tensor"):
            value = reader.read(name, ())
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module in adapter.a:
                delta = adapter.b[module].float() @ adapter.a[module].float()
                merged = value.float() + delta * adapter.scale_of(module)
                if adapter.use_dora:  # each row rescaled to its magnitude, as DoRA's forward does
                    merged *= (adapter.magnitude[module].float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1)
                value = merged.to(value.dtype)
            writer.write(name, value)
        writer.commit(
            [writer.written()], side_files_from=bridge.hf_dir, overwrite=overwrite, config=bridge.export_config()
        )
    except BaseException:
        writer.abort()
        raise
    return out_dir


def _in_order(shards: dict[str, dict[int, torch.Tensor]], name: str) -> list[torch.Tensor]:
    got = shards.get(name, {})
    if sorted(got) != list(range(len(got))) or not got:
        raise BridgeError(f"{name}: the checkpoint holds TP shards {sorted(got)} of it; expected every one")
    return [got[r] for r in range(len(got))]


def _alpha(record: dict[str, Any], module: str, alpha: float | None, ckpt_dir: str | Path) -> float:
    if module in record:
        return record[module]["alpha"]
    if alpha is None:
        raise BridgeError(
            f"{ckpt_dir}: LoRA alpha of {module} is missing: no {RECORD} records it; pass --alpha"
            " (Megatron-Bridge's run_config.yaml keeps it as peft.alpha)"
        )
    return alpha


# -- PEFT -> Megatron ----------------------------------------------------------------------------------
def import_adapter(
    peft_dir: str | Path,
    out_dir: str | Path,
    base: str | Path,
    layout: Layout | None = None,
    *,
    plugin: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the PEFT adapter ``peft_dir`` of the HF model ``base`` as Megatron adapter weights (a
    torch_dist checkpoint of the adapter alone, in Megatron-Bridge's layout) chunked for ``layout``."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner, mcore_to_pyt_state_dict
    from torch.distributed.checkpoint import save as dcp_save

    out_dir = Path(out_dir)
    check_target(out_dir, overwrite)
    layout = layout or Layout()
    bridge = Bridge.from_hf_pretrained(base, plugin=plugin)
    plan = AdapterPlan.of(bridge)
    peft = read_peft(peft_dir)
    bridge.plan_conversion(layout)
    with simulated_rank(0, 1, Layout()):
        linears = _linears(bridge.build_chunks(Layout(), meta=True), bridge.config)
    adapted, source = plan.from_peft(peft, [m for m in linears if plan.bindings(m) is not None])
    if not adapted:
        raise BridgeError(f"{peft_dir}: adapts none of the base model's linears")
    plan.check_split(adapted, layout)

    saved: dict[str, list[Any]] = {}
    made: dict[tuple[str, int], torch.Tensor] = {}
    common = None
    world = layout.pp * math.lcm(layout.tp, layout.ep * layout.etp)
    for rank in range(world):
        with simulated_rank(rank, world, layout):
            chunks = bridge.build_chunks(layout, meta=True)
            linears = _linears(chunks, bridge.config)
            adapt(chunks, [(linears[m], a) for m, a in adapted.items() if m in linears])
            _, views, rank_common = main_chunks(chunks, local_tensors(chunks, bridge.config))
        common = common if common is not None else rank_common
        for item, param, region in views:
            if adapted_module(param.name) is None:
                continue
            if any(tuple(i.global_offset) == tuple(item.global_offset) for i in saved.get(item.key, [])):
                continue
            value = made.get((param.name, param.shard.rank))
            if value is None:
                value = made[(param.name, param.shard.rank)] = _make(plan, source, param)
            data = region.of(value).contiguous()
            saved.setdefault(item.key, []).append(dataclasses.replace(item, data=data, dtype=data.dtype))
    if common_in_shards():
        state = ShardedObject(COMMON_STATE, common, (1,), (0,), replica_id=0)
        saved[state.unique_key] = [state]

    with checkpoint.staged_release(out_dir) as temp:
        with simulated_rank(0, 1, Layout()):
            dcp_save(
                mcore_to_pyt_state_dict(saved, False),
                storage_writer=file_writer(temp / RELEASE),
                planner=MCoreSavePlanner(flatten_state_dict=False),
                no_dist=True,
            )
        strategy = get_default_save_sharded_strategy()
        save_config(CheckpointingConfig(strategy.backend, strategy.version), str(temp / RELEASE))
        if not common_in_shards():
            torch.save(common, temp / RELEASE / COMMON_FILE)
        (temp / TRACKER).write_text(RELEASE)
        record = {
            "base": str(base),
            "plugin": bridge.plugin.name,
            "layout": dataclasses.asdict(layout),
            "modules": {m: {"dim": a.dim, "alpha": a.alpha, "dora": a.dora} for m, a in sorted(adapted.items())},
        }
        (temp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        check_target(out_dir, overwrite)
        move_into_place(temp, out_dir)
    return out_dir


def _make(plan: AdapterPlan, source: Any, param: LocalTensor) -> torch.Tensor:
    """This rank's shard of one adapter weight, from the PEFT tensors, in their dtype."""
    binding = plan.table.find(param.name)
    value = binding.mapping.to_megatron(source, binding.capture_dict, param.shard)
    if tuple(value.shape) != tuple(param.tensor.shape):
        raise BridgeError(
            f"{param.name}: {binding.mapping!r} made shape {list(value.shape)} from {', '.join(binding.hf)},"
            f" but the Megatron adapter weight has {list(param.tensor.shape)}"
        )
    return value.contiguous()
