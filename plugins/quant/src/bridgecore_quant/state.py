"""Quantizer state on a Megatron model: the containers, and attaching them where a checkpoint has amax.

A :class:`QuantizerState` stands in for a ModelOpt ``TensorQuantizer`` as far as conversion goes: it
holds the calibrated ``_amax`` as a persistent buffer, under the module name ModelOpt uses
(``<linear>.weight_quantizer``, ``<linear>.input_quantizer``, ``core_attention.k_bmm_quantizer``), so
the core converts it like any other tensor and a Megatron checkpoint carries it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from bridgecore.plugin import BridgeError, MappingTable, Source, Stacked
from bridgecore_quant.amax import INPUT_AMAX, KV_AMAX, PARTS, WEIGHT_AMAX, Amax, is_per_tensor, skeleton

#: the quantizer containers a checkpoint may carry, by the buffer's suffix.
AMAX_SUFFIX = "._amax"


class QuantizerState(torch.nn.Module):
    """The calibrated range of one quantizer: a persistent ``_amax`` buffer, fp32 like ModelOpt's.

    A per-tensor quantizer that serves ``parts`` fused HF linears also keeps their own amax, one row
    each, in ``_amax_parts`` (``_amax`` is their max).
    """

    def __init__(
        self,
        shape: Sequence[int],
        partition_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        parts: int = 0,
    ):
        super().__init__()
        self.register_buffer("_amax", torch.zeros(tuple(shape), dtype=dtype))
        if parts:
            self.register_buffer("_amax" + PARTS, torch.zeros((parts, *shape), dtype=dtype))
        #: the dim this rank's buffer is a TP slice of, like its weight's; None when whole.
        self.partition_dim = partition_dim
        if partition_dim is not None:
            # What the core's parameter iteration reads to split and gather a tensor over TP.
            self._amax.tensor_model_parallel = True
            self._amax.partition_dim = partition_dim

    @property
    def amax(self) -> torch.Tensor:
        return self._amax

    def extra_repr(self) -> str:
        return f"amax={list(self._amax.shape)}"


def has_amax(hf_keys: Iterable[str]) -> bool:
    return any(k.endswith("_quantizer" + AMAX_SUFFIX) for k in hf_keys)


def _local_shape(hf_shape: tuple[int, ...], dim: int | None, tp: int, name: str) -> tuple[int, ...]:
    if dim is None:
        return hf_shape
    if hf_shape[dim] % tp:
        raise BridgeError(f"{name}: amax of shape {list(hf_shape)} does not split over TP={tp} along dim {dim}")
    return hf_shape[:dim] + (hf_shape[dim] // tp,) + hf_shape[dim + 1 :]


def _candidates(model: torch.nn.Module) -> Iterable[tuple[str, str]]:
    """(module name, quantizer suffix) of every place a quantizer may sit, by local module name."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "weight", None), torch.nn.Parameter):
            yield name, WEIGHT_AMAX
            yield name, INPUT_AMAX
        if name.endswith("core_attention"):
            for suffix in KV_AMAX:
                yield name, suffix


def attach_quantizers(
    model: torch.nn.Module,
    table: MappingTable,
    source: Source,
    hf_keys: frozenset[str],
    global_name: Callable[[str], str],
    tp: int,
    etp: int,
    keep_parts: bool = True,
) -> list[str]:
    """Add a :class:`QuantizerState` wherever ``table`` maps an amax that ``source`` has.

    ``source`` is the HF checkpoint (or the record of it a Megatron checkpoint keeps), ``hf_keys``
    its tensor names: each buffer takes its tensor's shape. ``global_name`` turns a local module
    path into the global one the mappings speak; ``tp``/``etp`` are the (expert) TP sizes.
    Per-channel amax that keep the weight's partitioned dim are split over TP like the weight.
    A fused per-tensor quantizer also keeps its HF linears' own amax (``_amax_parts``) when
    ``keep_parts``. Returns the global names added.
    """
    added = []
    for local, suffix in _candidates(model):
        name = global_name(f"{local}.{suffix}" if local else suffix)
        binding = table.find(name)
        if binding is None or binding.hf[0] not in hf_keys:
            continue
        mapping = binding.mapping
        shape = tuple(source.shape(binding.hf[0]))
        stacked = isinstance(mapping, Stacked)
        inner = mapping.inner if stacked else mapping
        if stacked:
            shape = shape[1:]
        dim = inner.weight.partition_dim if isinstance(inner, Amax) and inner.splits(shape) else None
        size = etp if ".experts." in name else tp
        fused = isinstance(inner, Amax) and inner.fused and is_per_tensor(shape)
        parts = len(binding.hf) if fused and keep_parts else 0
        quantizer = QuantizerState(_local_shape(shape, dim, size, binding.hf[0]), dim, parts=parts)
        owner = model.get_submodule(local) if local else model
        owner.add_module(suffix.split(".")[0], quantizer)
        _save_quantizers_with(owner)
        added.append(name)
    return added


def _save_quantizers_with(owner: torch.nn.Module) -> None:
    """Make ``owner``'s torch_dist state carry its quantizers, split over TP where they are.

    megatron-core linears save child buffers as replicated (wrong for a TP-split per-channel amax)
    and ``core_attention`` saves none, so the owner's ``sharded_state_dict`` is wrapped, once.
    """
    if getattr(owner, "_bridgecore_quantizers", False):
        return
    if not hasattr(owner, "sharded_state_dict"):
        # A plain torch module (a vision tower's conv): the enclosing megatron module saves its
        # children's buffers, the quantizer's among them, as replicated tensors already.
        return
    own = owner.sharded_state_dict

    def sharded_state_dict(prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = own(prefix=prefix, sharded_offsets=sharded_offsets, metadata=metadata)
        quantizers = {n: q for n, q in owner.named_children() if isinstance(q, QuantizerState)}
        state = {f"{n}.{b}": t for n, q in quantizers.items() for b, t in q.named_buffers()}
        axes = {f"{n}._amax": q.partition_dim for n, q in quantizers.items() if q.partition_dim is not None}
        tp_group = getattr(owner, "tp_group", None) or ps.get_tensor_model_parallel_group()
        out |= make_sharded_tensors_for_checkpoint(
            state, prefix, axes, sharded_offsets, tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"]
        )
        return out

    owner.sharded_state_dict = sharded_state_dict
    owner._bridgecore_quantizers = True


def global_namer(model: torch.nn.Module, config: Any) -> Callable[[str], str]:
    """Local -> global names for one PP stage, as the core's parameter iteration names them."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.multi_token_prediction import get_mtp_layer_offset
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from bridgecore.plugin import global_name

    vp_stage = getattr(model, "vp_stage", None)
    layer_offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    mtp_offset = get_mtp_layer_offset(config, vp_stage=vp_stage)
    experts = config.num_moe_experts or 0
    ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    expert_offset = ep_rank * (experts // ep) if experts else 0
    return lambda local: global_name(local, layer_offset, mtp_offset, expert_offset)


def fused_notes(table: MappingTable, source: Source, hf_keys: frozenset[str]) -> list[str]:
    """What importing ``source`` does to the fused quantizers that megatron-core cannot hold as read.

    ModelOpt calibrates q/k/v, gate/up and the GDN ``in_proj`` parts one by one; Megatron fuses
    them into one linear with one quantizer, which takes the group's max. Parts without any amax
    (left unquantized by ModelOpt) are covered by that quantizer too in a quantized Megatron forward.
    """
    by_kind: dict[str, list[str]] = {}
    for key in sorted(hf_keys):
        if key.endswith(AMAX_SUFFIX):
            by_kind.setdefault(skeleton(key), []).append(key)
    groups, differing, largest, partial = 0, 0, (1.0, ""), ""
    for mapping in table.mappings:
        stacked = isinstance(mapping, Stacked)
        amax = mapping.inner if stacked else mapping
        if not isinstance(amax, Amax) or not amax.fused:
            continue
        for key in by_kind.get(skeleton(amax.hf[0].text), ()):
            captures = _hf_captures(amax.hf[0].text, key)
            names = [] if captures is None else amax.hf_names(captures)
            shape = tuple(source.shape(key))
            if not names or any(n not in hf_keys for n in names) or not is_per_tensor(shape[1:] if stacked else shape):
                continue
            if amax.absent and not partial:
                whole = set(amax.megatron.fields) <= set(captures)  # a stacked HF name has no {expert}
                megatron = amax.megatron.format(captures) if whole else amax.megatron.text
                partial = f"{amax.absent[0].format(captures)}; its quantizer is {megatron}"
            values = torch.stack([source.read(n, ()).float() for n in names])
            groups += 1
            low, high = values.amin(0), values.amax(0)
            if bool((low != high).any()):
                differing += 1
                ratio = float((high / low.clamp_min(torch.finfo(torch.float32).tiny)).max())
                if ratio > largest[0]:
                    largest = (ratio, ", ".join(names))
    notes = []
    if differing:
        notes.append(
            f"{differing} of {groups} amax groups differ across the HF linears Megatron fuses into one quantizer,"
            f" which takes the group's max (largest ratio {largest[0]:.3g}: {largest[1]});"
            " each linear's own amax is kept for export"
        )
    if partial:
        notes.append(
            f"HF linears fused with quantized ones have no amax (e.g. {partial}): megatron-core's fused"
            " quantizer cannot leave them out and covers them with the group's amax; export leaves them"
            " unquantized, as read"
        )
    return notes


_FIELD = re.compile(r"\{([a-z_]+)([+-]\d+)?\}")


def _hf_captures(pattern: str, name: str) -> dict[str, int] | None:
    """The captures that format HF ``pattern`` (which may shift one: ``{mtp+45}``) as ``name``."""
    parts, offsets, pos = [], {}, 0
    for m in _FIELD.finditer(pattern):
        parts += [re.escape(pattern[pos : m.start()]), f"(?P<{m.group(1)}>\\d+)"]
        offsets[m.group(1)] = int(m.group(2) or 0)
        pos = m.end()
    found = re.fullmatch("".join(parts) + re.escape(pattern[pos:]), name)
    return None if found is None else {k: int(v) - offsets[k] for k, v in found.groupdict().items()}
