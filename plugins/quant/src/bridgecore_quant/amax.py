"""Quantizer amax mappings, derived from any plugin's weight mappings.

ModelOpt gives every quantized linear ``<m>`` two buffers, ``<m>.weight_quantizer._amax`` and
``<m>.input_quantizer._amax``, and attention ``<attn>.k_bmm_quantizer._amax`` /
``v_bmm_quantizer._amax``. An amax follows its weight: where Megatron fuses several HF linears
(q/k/v into ``linear_qkv``, gate/up into ``linear_fc1``) one Megatron quantizer serves them all.

- Per-tensor amax (shape ``[]`` or ``[1]``, kept as the checkpoint has it) of fused HF linears are
  calibrated separately by ModelOpt, so they may differ. The Megatron quantizer (``_amax``) takes
  their max, the value ModelOpt's own NVFP4 export unifies a shared-input group to; the HF values
  themselves travel beside it in ``_amax_parts`` (``[n, *amax shape]``, one row per HF linear that
  has an amax), which export writes back. HF linears of a fused group that carry no amax (GDN
  ``in_proj_a``/``in_proj_b``, which ModelOpt's recipes leave unquantized) are left out of the
  group: ``hf_keys`` says which parts exist, and export leaves them without amax, as read.
- Per-channel (``[out, 1]``) and per-block (``[out, in/16]``) amax are laid out like the weight
  itself: the weight mapping's layout is reused on the amax names, so a fused QKV amax is
  interleaved per query group and split over TP exactly as the weight rows are. Along a weight dim
  the amax has reduced to size 1 (a row-parallel weight's per-channel amax) nothing is split.
- Stacked HF experts (``moe.gate_proj.weight`` ``[E, I, H]``) carry stacked amax:
  ``moe.gate_proj.weight_quantizer._amax`` of shape ``[E]`` (per-tensor, one per expert) or
  ``[E, I, 1]`` (per-channel), and ``moe.gate_proj.input_quantizer._amax`` of shape ``[E]``;
  each Megatron expert holds its slab.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Sequence

import torch

from bridgecore.errors import BridgeError
from bridgecore.mapping import (
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
    return frozenset(skeleton(k) for k in hf_keys or () if k.endswith("_quantizer._amax"))


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

    def to_hf(self, shards: list[torch.Tensor], captures: dict[str, int]) -> list[HFPiece]:
        if not is_per_tensor(shards[0].shape):
            return self.layout.to_hf(shards, captures)
        if not shards[0].is_meta and any(not torch.equal(s, shards[0]) for s in shards[1:]):
            raise BridgeError(f"{self.megatron.format(captures)}: TP ranks hold different per-tensor amax values")
        if self.fused:
            return []  # the HF linears' own values come from the ``_amax_parts`` beside it (AmaxParts)
        return [HFPiece(self.hf_names(captures)[0], shards[0].clone())]


class AmaxParts(Mapping):
    """``<m>.X_quantizer._amax_parts`` ``[n, *amax shape]``: the per-tensor amax of a fused group's HF linears.

    Megatron's fused quantizer holds one amax; this buffer keeps each HF linear's own, so that a
    round trip and the deployable export give back per-projection values.
    """

    def __init__(self, amax: Amax):
        super().__init__(amax.megatron.text + PARTS, [p.text for p in amax.hf], layers=amax.weight.layers)

    def to_megatron(self, source: Source, captures: dict[str, int], shard: Shard) -> torch.Tensor:
        return torch.stack([source.read(n, ()) for n in self.hf_names(captures)])

    def to_hf(self, shards: list[torch.Tensor], captures: dict[str, int]) -> list[HFPiece]:
        return [HFPiece(n, shards[0][i].clone()) for i, n in enumerate(self.hf_names(captures))]


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


#: ModelOpt's quantizers on transformers' fused experts (``<moe>.experts.gate_up_proj_weight_quantizers.{e}``
#: and one ``<moe>.experts.gate_up_proj_input_quantizer`` for all experts), as ``save_pretrained`` writes them.
_FUSED_EXPERTS = re.compile(r"\.experts\.[a-z_]+_(weight_quantizers\.\d+|input_quantizer)\._amax\Z")


def check_fused_experts(hf_keys: Collection[str] | None) -> None:
    """Refuse amax of transformers' fused experts: they are named after modules the checkpoint lacks."""
    found = sorted(k for k in hf_keys or () if _FUSED_EXPERTS.search(k))
    if found:
        raise BridgeError(
            f"{found[0]} (and {len(found) - 1} more): ModelOpt quantized transformers' fused experts, and"
            " save_pretrained names their quantizers after transformers' in-memory modules (one input amax for"
            " all experts of a layer) while the expert weights keep the checkpoint's names; bridgecore-quant"
            " cannot map them to the experts yet (dense layers, attention and shared experts it can)"
        )


def amax_mappings(mappings: Sequence[Mapping], hf_keys: Collection[str] | None = None) -> list[Mapping]:
    """Every amax mapping the weight ``mappings`` of any family imply, for a checkpoint with ``hf_keys``."""
    check_fused_experts(hf_keys)
    out: list[Mapping] = []
    kinds = amax_kinds(hf_keys)
    for m in mappings:
        if is_quantizable(m):
            out += weight_amax_mappings(m, kinds)
        if isinstance(m, FusedQKV):
            out += kv_amax_mappings(m)
    return out
