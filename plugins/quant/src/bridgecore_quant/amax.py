"""Quantizer amax mappings, derived from any plugin's weight mappings.

ModelOpt gives every quantized linear ``<m>`` two buffers, ``<m>.weight_quantizer._amax`` and
``<m>.input_quantizer._amax``, and attention ``<attn>.k_bmm_quantizer._amax`` /
``v_bmm_quantizer._amax``. An amax follows its weight: where Megatron fuses several HF linears
(q/k/v into ``linear_qkv``, gate/up into ``linear_fc1``) one Megatron quantizer serves them all.

- Per-tensor amax (shape ``[]`` or ``[1]``, kept as the checkpoint has it) of fused HF linears are
  calibrated separately by ModelOpt, so they may differ. The Megatron quantizer (``_amax``) takes
  their max, the value ModelOpt's own NVFP4 export unifies a shared-input group to; the HF values
  themselves travel beside it in ``_amax_parts`` (``[n, *amax shape]``, one row per HF linear that
  has an amax), which export writes back while ``_amax`` is still their max. Once ``_amax`` changed
  (recalibration or QAT in Megatron), or where a checkpoint has no ``_amax_parts`` (Megatron-LM
  saves only ``_amax``), every HF linear of the group is exported with ``_amax``, and export says
  so. HF linears of a fused group that carry no amax (GDN ``in_proj_a``/``in_proj_b``, which
  ModelOpt's recipes leave unquantized) are left out of the group: ``hf_keys`` says which parts
  exist, and export leaves them without amax, as read.
- Per-channel (``[out, 1]``) and per-block (``[out, in/16]``) amax are laid out like the weight
  itself: the weight mapping's layout is reused on the amax names, so a fused QKV amax is
  interleaved per query group and split over TP exactly as the weight rows are. Along a weight dim
  the amax has reduced to size 1 (a row-parallel weight's per-channel amax) nothing is split.
- Stacked HF experts (``moe.gate_proj.weight`` ``[E, I, H]``) carry stacked amax:
  ``moe.gate_proj.weight_quantizer._amax`` of shape ``[E]`` (per-tensor, one per expert) or
  ``[E, I, 1]`` (per-channel), and ``moe.gate_proj.input_quantizer._amax`` of shape ``[E]``;
  each Megatron expert holds its slab.
- transformers' fused experts, as ModelOpt quantizes them, carry one amax per expert under the fused
  module's name and one input amax shared by the layer's experts (:func:`fused_expert_amax_mappings`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Sequence

import torch

from bridgecore.plugin import (
    BridgeError,
    Broadcast,
    FusedQKV,
    HFPiece,
    Mapping,
    Pattern,
    Replicated,
    Shard,
    Shifted,
    Source,
    Stacked,
)

WEIGHT_AMAX = "weight_quantizer._amax"
INPUT_AMAX = "input_quantizer._amax"
KV_AMAX = ("k_bmm_quantizer._amax", "v_bmm_quantizer._amax")
#: the buffer beside a fused quantizer's ``_amax`` that keeps its HF linears' own amax.
PARTS = "_parts"
#: what export notes when a fused quantizer's HF linears all get its own amax, and why.
STALE_PARTS = (
    "these fused quantizers' amax changed after import, so their HF linears' own amax (kept at import)"
    " no longer hold; each linear of the group was exported with the quantizer's amax"
)
NO_PARTS = (
    "the checkpoint keeps no per-linear amax for these fused quantizers (a training run saves only"
    " `_amax`); each linear of the group was exported with the quantizer's amax"
)
#: Megatron weights that are not matmuls, so no ModelOpt quantizer sits on them.
_NOT_LINEAR = ("norm", "embedding", "conv1d")


def module_of(text: str) -> str:
    """``a.b.linear_qkv.weight`` -> ``a.b.linear_qkv``."""
    return text.rsplit(".", 1)[0]


def is_per_tensor(shape: Sequence[int]) -> bool:
    return len(shape) <= 1 and (not shape or shape[0] == 1)


def skeleton(name: str) -> str:
    """A name or pattern with every index and capture as ``#``: equal for names of one kind."""
    return re.sub(r"\d+", "#", re.sub(r"\{[a-z_]+([+-]\d+)?\}", "#", name))


def amax_kinds(hf_keys: Collection[str] | None) -> frozenset[str]:
    """The kinds (names with indices as ``#``) of the amax tensors among ``hf_keys``."""
    return frozenset(skeleton(k) for k in hf_keys or () if k.endswith("._amax") and "_quantizer" in k)


def present(names: Sequence[str], kinds: Collection[str]) -> list[str]:
    """The amax ``names`` (patterns) of one fused group that the checkpoint has; all when it has none."""
    found = [n for n in names if skeleton(n) in kinds]
    return found or list(names)


def _renamed(mapping: Mapping, megatron: str, hf: Sequence[str]) -> Mapping:
    """A copy of ``mapping`` (same type and layout parameters) on other tensor names."""
    out = copy.copy(mapping)
    out.megatron, out.hf = Pattern(megatron), tuple(Pattern(h) for h in hf)
    return out


class Amax(Mapping):
    """One amax buffer of the quantized linear that ``weight`` (a ``<m>.weight`` mapping) fills.

    ``kinds`` (:func:`amax_kinds` of the checkpoint) narrows a fused group's per-tensor amax to the
    HF linears that have one.
    """

    def __init__(self, weight: Mapping, suffix: str, kinds: Collection[str] = frozenset()):
        if not weight.megatron.text.endswith(".weight"):
            raise ValueError(f"{weight}: amax mappings derive from `.weight` mappings only")
        megatron = f"{module_of(weight.megatron.text)}.{suffix}"
        every = [f"{module_of(p.text)}.{suffix}" for p in weight.hf]
        #: whether Megatron fuses several HF linears into this quantizer.
        self.fused = len(every) > 1
        super().__init__(megatron, present(every, kinds) if self.fused else every, layers=weight.layers)
        #: the fused HF linears the checkpoint has no amax for (unquantized there).
        self.absent = [Pattern(n) for n in every if n not in {p.text for p in self.hf}]
        self.weight = weight
        self.layout = _renamed(weight, megatron, every)

    @property
    def partition_dim(self) -> int | None:  # type: ignore[override]
        # Only amax that keep the weight's partitioned dim are split; state.attach decides per buffer.
        return self.weight.partition_dim

    def splits(self, shape: Sequence[int]) -> bool:
        """Whether an amax of this (HF) shape is split over TP like the weight."""
        dim = self.weight.partition_dim
        return not is_per_tensor(shape) and dim is not None and len(shape) > dim and shape[dim] > 1

    def to_megatron(self, source: Source, captures: dict[str, int], shard: Shard) -> torch.Tensor:
        names = self.hf_names(captures)
        shapes = [tuple(source.shape(n)) for n in names]
        if not any(is_per_tensor(s) for s in shapes):
            return self.layout.to_megatron(source, captures, shard)
        if len(set(shapes)) > 1:
            raise BridgeError(
                f"{names[0]}: one Megatron quantizer serves {', '.join(names)}, but their amax shapes differ: {shapes}"
            )
        # The group's max: what ModelOpt's NVFP4 export unifies a shared-input group to.
        return torch.stack([source.read(n, ()) for n in names]).amax(0)

    def needs(self, captures: dict[str, int]) -> list[str]:
        # A fused quantizer exports its HF linears' own amax, kept beside it, unless they are stale.
        return [self.megatron.format(captures) + PARTS] if self.fused else []

    def to_hf(
        self, shards: list[torch.Tensor], captures: dict[str, int], given: Sequence[torch.Tensor | None] = (None,)
    ) -> list[HFPiece]:
        if not is_per_tensor(shards[0].shape):
            return self.layout.to_hf(shards, captures)
        amax, names = shards[0], self.hf_names(captures)
        if not amax.is_meta and any(not torch.equal(s, amax) for s in shards[1:]):
            raise BridgeError(f"{self.megatron.format(captures)}: TP ranks hold different per-tensor amax values")
        if not self.fused:
            return [HFPiece(names[0], amax.clone())]
        parts, group = given[0], self.megatron.format(captures)
        if parts is not None and (amax.is_meta or torch.equal(parts.amax(0), amax)):
            return [HFPiece(n, parts[i].clone()) for i, n in enumerate(names)]
        # No parts (a Megatron-LM run saves only ``_amax``), or ``_amax`` changed after import
        # (recalibration, QAT): every HF linear takes the fused value, as ModelOpt unifies such a group.
        note = (STALE_PARTS if parts is not None else NO_PARTS, group)
        return [HFPiece(n, amax.clone(), note=note) for n in names]


class AmaxParts(Mapping):
    """``<m>.X_quantizer._amax_parts`` ``[n, *amax shape]``: the per-tensor amax of a fused group's HF linears.

    Megatron's fused quantizer holds one amax; this buffer keeps each HF linear's own, so that a
    round trip and the deployable export give back per-projection values. Export writes them through
    the quantizer's :class:`Amax`, which needs this buffer and knows whether it still holds.
    """

    def __init__(self, amax: Amax):
        super().__init__(amax.megatron.text + PARTS, [p.text for p in amax.hf], layers=amax.weight.layers)

    def to_megatron(self, source: Source, captures: dict[str, int], shard: Shard) -> torch.Tensor:
        return torch.stack([source.read(n, ()) for n in self.hf_names(captures)])

    def to_hf(self, shards: list[torch.Tensor], captures: dict[str, int]) -> list[HFPiece]:
        return []  # the fused quantizer's mapping (Amax) writes them, knowing whether they still hold


def is_quantizable(mapping: Mapping) -> bool:
    """Whether ``mapping`` fills the weight of a linear ModelOpt may quantize."""
    if isinstance(mapping, Shifted) or not mapping.megatron.text.endswith(".weight"):
        return False
    leaf = module_of(mapping.megatron.text).rsplit(".", 1)[-1]
    return not any(word in leaf for word in _NOT_LINEAR)


def weight_amax_mappings(weight: Mapping, kinds: Collection[str] = frozenset()) -> list[Mapping]:
    """The weight and input amax mappings of one quantizable weight mapping (and their parts if fused)."""
    inner = weight.inner if isinstance(weight, Stacked) else weight
    out: list[Mapping] = []
    for suffix in (WEIGHT_AMAX, INPUT_AMAX):
        amax = Amax(inner, suffix, kinds)
        out += [amax, AmaxParts(amax)] if amax.fused else [amax]
    return [Stacked(m, weight.num_experts) for m in out] if isinstance(weight, Stacked) else out


def kv_amax_mappings(qkv: FusedQKV) -> list[Mapping]:
    """``<attn>.core_attention.{k,v}_bmm_quantizer._amax`` <-> ``<hf attn>.{k,v}_bmm_quantizer._amax``.

    Derived only when HF q, k and v live under one attention module (``<hf attn>.q_proj.weight``).
    """
    parents = {module_of(module_of(p.text)) for p in qkv.hf[:3]}
    if len(parents) != 1:
        return []
    hf_attn, attn = parents.pop(), module_of(module_of(qkv.megatron.text))
    return [Replicated(f"{attn}.core_attention.{s}", f"{hf_attn}.{s}", layers=qkv.layers) for s in KV_AMAX]


class FusedExpertAmax(Replicated):
    """One expert's per-tensor amax under ModelOpt's fused-experts name, the same on every (E)TP rank."""

    def to_megatron(self, source: Source, captures: dict[str, int], shard: Shard) -> torch.Tensor:
        name = self.hf_names(captures)[0]
        if not is_per_tensor(source.shape(name)):
            raise BridgeError(
                f"{name}: shape {list(source.shape(name))}; amax of transformers' fused experts convert per"
                " tensor only ([] or [1])"
            )
        return super().to_megatron(source, captures, shard)


#: a per-expert HF weight, ``<experts>.{expert}.<leaf>.weight``.
_PER_EXPERT = re.compile(r"(?P<experts>.+\.experts)\.\{expert\}\.[a-z_]+\.weight")


def _stacked_experts(hf: str, fused: str, kinds: Collection[str]) -> str | None:
    """The fused experts module whose amax a stacked HF weight (``<layer>.moe.gate_proj.weight``) has.

    A checkpoint of the released layout that transformers reads with renaming (Step-3.7's
    ``moe.*`` are its ``mlp.experts``) keeps the weights' released names while ModelOpt's amax keep
    the in-memory module's: the one ``*experts`` module of the same layer that has them.
    """
    head, sep, _ = hf.partition("{layer}")
    if not sep:
        return None
    layer = head + "{layer}"
    pattern = re.compile(
        rf"{re.escape(skeleton(layer))}\.((?:[a-z_]+\.)*experts)\.{re.escape(fused)}_weight_quantizers\.#\._amax"
    )
    found = {m.group(1) for k in kinds if (m := pattern.fullmatch(k))}
    return f"{layer}.{found.pop()}" if len(found) == 1 else None


def fused_expert_amax_mappings(weight: Mapping, kinds: Collection[str]) -> list[Mapping]:
    """ModelOpt's quantizers on transformers' fused experts, for the expert weight mapping ``weight``.

    ModelOpt quantizes transformers' fused experts (``<experts>.gate_up_proj`` ``[E, 2I, H]``,
    ``<experts>.down_proj``) as they are in memory, and ``save_pretrained`` names their amax after
    those modules while the weights keep the checkpoint's names (per expert, or stacked under the
    released layout's names): one weight amax per expert
    (``<experts>.gate_up_proj_weight_quantizers.{e}._amax``, gate and up together) and one input
    amax for all experts of the layer (``<experts>.gate_up_proj_input_quantizer._amax``), which every
    Megatron expert's input quantizer holds a copy of (:class:`~bridgecore.mapping.Broadcast`).
    Empty when the checkpoint has no such amax for ``weight``.
    """
    inner = weight.inner if isinstance(weight, Stacked) else weight
    if not inner.expert_capture:
        return []
    hf = inner.hf[0].text
    # transformers fuses gate and up into ``gate_up_proj``; a single projection keeps its name
    fused = "gate_up_proj" if len(inner.hf) == 2 else module_of(hf).rsplit(".", 1)[-1]
    if isinstance(weight, Stacked):
        experts = _stacked_experts(hf, fused, kinds)
    else:
        found = _PER_EXPERT.fullmatch(hf)
        experts = found["experts"] if found else None
    weight_amax = f"{experts}.{fused}_weight_quantizers.{{expert}}._amax"
    if experts is None or skeleton(weight_amax) not in kinds:
        return []
    module, layers = module_of(inner.megatron.text), inner.layers
    return [
        FusedExpertAmax(f"{module}.{WEIGHT_AMAX}", weight_amax, layers=layers),
        Broadcast(FusedExpertAmax(f"{module}.{INPUT_AMAX}", f"{experts}.{fused}_input_quantizer._amax", layers=layers)),
    ]


def amax_mappings(mappings: Sequence[Mapping], hf_keys: Collection[str] | None = None) -> list[Mapping]:
    """Every amax mapping the weight ``mappings`` of any family imply, for a checkpoint with ``hf_keys``."""
    out: list[Mapping] = []
    kinds = amax_kinds(hf_keys)
    for m in mappings:
        if is_quantizable(m):
            out += fused_expert_amax_mappings(m, kinds) or weight_amax_mappings(m, kinds)
        if isinstance(m, FusedQKV):
            out += kv_amax_mappings(m)
    return out
