"""What one adapter conversion maps: the LoRA weights of every adapted linear, as plain data.

The LoRA mappings come from the model's own mappings (:mod:`bridgecore.mapping.lora`), so every
plugin, first- or third-party, has them without code of its own. This plan decides, per Megatron
linear, which HF modules its adapter covers and how PEFT's per-module adapters become one Megatron
adapter:

- modules of one fused linear with the same A (what an export of a Megatron adapter writes): that A,
  rank r, and each module's B;
- with different A (adapters trained on HF modules): the A's stacked (rank k*r) and each module's B
  placed in its own block of columns, zeros elsewhere, so ``B_fused @ A_fused`` has exactly each
  module's ``B_i @ A_i`` in its rows; alpha grows with the rank so the scale stays ``alpha / r``;
- a module of a fused linear that PEFT did not adapt gets zero rows of B (its delta is zero).

The scale (``alpha / r``) must be the same for every module of one Megatron linear: one Megatron
adapter has one scale.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from bridgecore.errors import BridgeError
from bridgecore.hf.peft import PeftAdapter
from bridgecore.mapping import Binding, HFPiece, MappingTable, Pattern, TensorSource
from bridgecore.mapping.lora import HF_SUFFIX, MEGATRON_SUFFIX, lora_mappings
from bridgecore.megatron.adapters import Adapted, adapter_weights
from bridgecore.megatron.parallel import Layout
from bridgecore.plan.bridge import Bridge


def _module(hf_name: str, which: str) -> str:
    return hf_name[: -len(HF_SUFFIX[which]) - 1]


@dataclass
class AdapterPlan:
    """The LoRA weights' mappings of ``bridge``'s model, and the linears that cannot carry one."""

    bridge: Bridge
    table: MappingTable
    refused: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def of(cls, bridge: Bridge) -> AdapterPlan:
        mappings, refused = lora_mappings(bridge.mapping_table().mappings)
        return cls(bridge, MappingTable(mappings), [(m.megatron.text, why) for m, why in refused])

    def bindings(self, module: str) -> tuple[Binding, Binding] | None:
        """The (A, B) bindings of the Megatron linear ``module`` (global name), or None if it has none."""
        a_name, b_name = adapter_weights(module)
        a, b = self.table.find(a_name), self.table.find(b_name)
        return None if a is None or b is None else (a, b)

    def hf_modules(self, module: str) -> list[str]:
        found = self.bindings(module)
        return [] if found is None else [_module(n, "A") for n in found[0].hf]

    def why_not(self, module: str) -> str:
        """Why the Megatron linear ``module`` has no LoRA mapping: its base mapping's refusal, if any."""
        for pattern, why in self.refused:
            if Pattern(pattern).match(f"{module}.weight") is not None:
                return why
        return f"{module}: no mapping of the base model maps {module}.weight"

    # -- PEFT -> Megatron ----------------------------------------------------------------------------
    def from_peft(self, peft: PeftAdapter, modules: list[str]) -> tuple[dict[str, Adapted], TensorSource]:
        """The Megatron adapters that ``peft`` makes on the linears ``modules`` (global names, every
        one the model has), and the HF-side tensors their LoRA mappings read."""
        shapes = self.bridge.source.tensors if self.bridge.source else {}
        tensors: dict[str, torch.Tensor] = {}
        adapted: dict[str, Adapted] = {}
        used: set[str] = set()
        for module in modules:
            hf = self.hf_modules(module)
            present = [h for h in hf if h in peft.a]
            if not present:
                continue
            used.update(present)
            for h in present:
                _check_shapes(peft, h, shapes.get(f"{h}.weight"))
            scales = {h: peft.scale_of(h) for h in present}
            if len(set(scales.values())) > 1:
                raise BridgeError(
                    f"{module}: its HF modules have different LoRA scales (alpha / r:"
                    f" {', '.join(f'{h}={s}' for h, s in scales.items())}); one Megatron adapter has one scale"
                )
            if peft.use_dora:
                self._magnitudes(module, hf, present, peft, tensors)
            a, b = self.bindings(module)  # type: ignore[misc]
            split_a = a.mapping.split  # type: ignore[attr-defined]
            if split_a:  # a row-parallel linear: A follows the layout, B is shared
                tensors.update(self._shared(module, b, peft.b, present, "B"))
                for h in hf:
                    tensors[f"{h}.{HF_SUFFIX['A']}"] = peft.a.get(h, torch.zeros_like(peft.a[present[0]]))
                dim = peft.a[present[0]].shape[0]
            else:
                dim = self._fused(module, hf, present, peft, tensors, shapes)
            rank0 = peft.a[present[0]].shape[0]
            alpha = peft.alpha_of(present[0]) * (dim // rank0) if dim % rank0 == 0 else scales[present[0]] * dim
            adapted[module] = Adapted(module, dim, alpha, peft.use_dora)
        unused = sorted(peft.a.keys() - used)
        if unused:
            raise BridgeError(
                f"adapter module {unused[0]}{f' (and {len(unused) - 1} more)' if len(unused) > 1 else ''}:"
                f" the base model has no linear {unused[0]}.weight that a LoRA adapter maps onto"
            )
        return adapted, TensorSource(tensors)

    @staticmethod
    def _magnitudes(
        module: str, hf: list[str], present: list[str], peft: PeftAdapter, tensors: dict[str, torch.Tensor]
    ) -> None:
        """DoRA's magnitudes: each module's rows of the Megatron linear's. A module of the linear that the
        adapter leaves out would need its base weight's row norms; it is refused instead."""
        absent = [h for h in hf if h not in present]
        if absent:
            raise BridgeError(
                f"{module}: the DoRA adapter covers {', '.join(present)} but not {', '.join(absent)}, which"
                " share this Megatron linear (and so its magnitude); adapt all of them"
            )
        for h in hf:
            tensors[f"{h}.{HF_SUFFIX['M']}"] = peft.magnitude[h]

    @staticmethod
    def _shared(
        module: str, binding: Binding, weights: dict[str, torch.Tensor], present: list[str], which: str
    ) -> dict[str, torch.Tensor]:
        first = weights[present[0]]
        for h in present[1:]:
            if not torch.equal(weights[h], first):
                raise BridgeError(
                    f"{module}: lora_{which} of {present[0]} and {h} differ, and a Megatron adapter of this"
                    " linear holds one"
                )
        return {n: first for n in binding.hf}

    @staticmethod
    def _fused(
        module: str,
        hf: list[str],
        present: list[str],
        peft: PeftAdapter,
        tensors: dict[str, torch.Tensor],
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
    ) -> int:
        """A column-parallel linear: shared A if every adapted module has the same A, else stacked."""
        first = peft.a[present[0]]
        if all(torch.equal(peft.a[h], first) for h in present[1:]):
            a, blocks = first, {h: peft.b[h] for h in present}
        else:
            a = torch.cat([peft.a[h] for h in present])
            blocks, start = {}, 0
            for h in present:
                b = peft.b[h]
                block = torch.zeros(b.shape[0], a.shape[0], dtype=b.dtype)
                block[:, start : start + b.shape[1]] = b
                blocks[h], start = block, start + b.shape[1]
        for h in hf:
            tensors[f"{h}.{HF_SUFFIX['A']}"] = a
            b = blocks.get(h)
            if b is None:  # not adapted: zero rows of B, as many as the base weight has
                if f"{h}.weight" not in shapes:
                    raise BridgeError(f"{module}: {h} has no adapter, and the base checkpoint has no {h}.weight")
                b = torch.zeros(shapes[f"{h}.weight"][0][0], a.shape[0], dtype=first.dtype)
            tensors[f"{h}.{HF_SUFFIX['B']}"] = b
        return a.shape[0]

    def check_split(self, adapted: dict[str, Adapted], layout: Layout) -> None:
        """Refuse a rank that the layout cannot split: a column-parallel linear's adapter splits its A's
        rank rows over TP (expert TP for an expert's), as Megatron-Bridge's adapter linears do."""
        for module, a in adapted.items():
            found = self.bindings(module)
            if found is None or found[0].mapping.split:  # type: ignore[attr-defined]
                continue
            expert = ".experts." in module
            size = layout.etp if expert else layout.tp
            if a.dim % size:
                raise BridgeError(
                    f"{module}: LoRA rank {a.dim} does not split over {'ETP' if expert else 'TP'}={size}"
                    " (a column-parallel linear's adapter splits its rank)"
                )

    # -- Megatron -> PEFT ----------------------------------------------------------------------------
    def to_peft(
        self, adapters: dict[str, tuple[Adapted, dict[str, list[torch.Tensor]]]], base: str | None
    ) -> PeftAdapter:
        """The PEFT adapter of Megatron adapters: per linear (global name) its :class:`Adapted` and the
        shards of every TP rank, in rank order, of each of its weights ("A", "B", and DoRA's "M")."""
        out: dict[str, dict[str, torch.Tensor]] = {"A": {}, "B": {}, "M": {}}
        dims: dict[str, int] = {}
        alphas: dict[str, float] = {}
        dora = {a.dora for a, _ in adapters.values()}
        if len(dora) > 1:
            raise BridgeError(
                "some adapted linears carry DoRA magnitudes and others do not; a PEFT adapter is DoRA or LoRA whole"
            )
        for module, (adapted, shards) in sorted(adapters.items()):
            if self.bindings(module) is None:
                raise BridgeError(self.why_not(module))
            for which, weights in shards.items():
                binding = self.table.find(f"{module}.{MEGATRON_SUFFIX[which]}")
                for piece in binding.mapping.to_hf(weights, binding.capture_dict):  # type: ignore[union-attr]
                    out[which][_module(piece.name, which)] = _piece(piece)
            for h in self.hf_modules(module):
                dims[h], alphas[h] = adapted.dim, adapted.alpha
        r = Counter(dims.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        return PeftAdapter(
            r=r,
            alpha=alpha,
            a=out["A"],
            b=out["B"],
            magnitude=out["M"],
            use_dora=dora == {True},
            rank_pattern={h: d for h, d in sorted(dims.items()) if d != r},
            alpha_pattern={h: v for h, v in sorted(alphas.items()) if v != alpha},
            base_model_name_or_path=base,
        )


def _piece(piece: HFPiece) -> torch.Tensor:
    if piece.expert is not None:
        raise BridgeError(f"{piece.name}: a slab of a stacked expert tensor; LoRA adapters map per-expert tensors")
    return piece.tensor


def _check_shapes(peft: PeftAdapter, module: str, base: tuple[tuple[int, ...], torch.dtype] | None) -> None:
    if base is None:
        return
    (rows, cols), a, b = base[0][-2:], peft.a[module], peft.b[module]
    if a.shape[1] != cols or b.shape[0] != rows:
        raise BridgeError(
            f"adapter module {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit the base"
            f" weight {module}.weight {[rows, cols]} (an adapter for another base model?)"
        )
