"""LoRA adapters on a megatron-core model, in Megatron-Bridge's checkpoint layout.

Megatron-Bridge keeps a LoRA adapter of a linear ``X`` beside its weight, as two linears under
``X.adapter``: ``linear_in`` (A, rank x input) and ``linear_out`` (B, output x rank); the adapted
output is ``X(x) + linear_out(linear_in(x)) * alpha / dim``. The adapter's linears are split over
TP as Megatron-Bridge splits them:

- a column-parallel ``X`` (linear_qkv, linear_fc1, GDN in_proj): ``linear_in`` column-parallel with
  its output gathered (A's rank rows split over TP), ``linear_out`` column-parallel like ``X`` (B's
  output rows split as ``X``'s are);
- a row-parallel ``X`` (linear_proj, linear_fc2): ``linear_in`` row-parallel on the parallel input
  (A's input columns split as ``X``'s are), ``linear_out`` column-parallel with its output gathered.

DoRA adds ``X.adapter.weight_magnitude``, one value per output row of ``X``: split over TP as the
output of a column-parallel ``X``, whole on every rank of a row-parallel one (as Megatron-Bridge saves
it). A gated ``linear_fc1``'s ``linear_out`` is saved as megatron-core saves the weight (gate rows of every
rank, then up rows), so its saved form does not depend on TP. ``adapt`` puts such an adapter on
linears of a built model in place: the linear keeps its class (it is subclassed), its parameter
names and its own saved entries, so the base tensors stay where every other part of the core looks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from bridgecore.errors import BridgeError

#: the suffixes of an adapter's weights, after the adapted linear's module name.
LINEAR_IN = "adapter.linear_in.weight"
LINEAR_OUT = "adapter.linear_out.weight"
MAGNITUDE = "adapter.weight_magnitude"


@dataclass(frozen=True)
class Adapted:
    """One adapted linear: its module name (global), rank and alpha, and whether it is DoRA's."""

    module: str
    dim: int
    alpha: float
    dora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.dim


def adapter_weights(module: str) -> tuple[str, str]:
    """The names of the adapter weights (``linear_in``, ``linear_out``) of the linear ``module``."""
    return f"{module}.{LINEAR_IN}", f"{module}.{LINEAR_OUT}"


def adapted_module(name: str) -> tuple[str, str] | None:
    """(the adapted linear's module name, "in", "out" or "magnitude") for an adapter weight's name,
    else None."""
    for suffix, which in ((LINEAR_IN, "in"), (LINEAR_OUT, "out"), (MAGNITUDE, "magnitude")):
        if name.endswith(f".{suffix}"):
            return name[: -len(suffix) - 1], which
    return None


class LoRA(torch.nn.Module):
    """The adapter of one megatron-core linear: ``linear_in`` then ``linear_out``, scaled."""

    def __init__(self, base: torch.nn.Module, column: bool, adapted: Adapted, swiglu: bool):
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        super().__init__()
        dim = adapted.dim
        tp = base.tp_group.size()
        rows, cols = base.weight.shape
        common: dict[str, Any] = {
            "config": base.config,
            "init_method": torch.nn.init.zeros_,
            "bias": False,
            "is_expert": getattr(base, "is_expert", False),
            "tp_group": base.tp_group,
        }
        if column:
            self.linear_in = ColumnParallelLinear(cols, dim, gather_output=True, **common)
            out_features = rows * tp
        else:
            self.linear_in = RowParallelLinear(cols * tp, dim, input_is_parallel=True, skip_bias_add=True, **common)
            out_features = rows
        self.linear_out = ColumnParallelLinear(dim, out_features, gather_output=not column, **common)
        self.dim, self.alpha, self.swiglu, self.column = dim, adapted.alpha, swiglu, column
        self.tp_group = base.tp_group
        if adapted.dora:  # one per output row this rank computes; split over TP as those rows are
            self.weight_magnitude = torch.nn.Parameter(torch.empty(rows, dtype=base.weight.dtype))
            if column:
                set_tensor_model_parallel_attributes(self.weight_magnitude, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "weight_magnitude"):
            raise BridgeError("the forward of a DoRA adapter is not supported here; converting its weights is")
        hidden, _ = self.linear_in(x)
        out, _ = self.linear_out(hidden)
        return out * (self.alpha / self.dim)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple[Any, ...] = (), metadata: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint

        state = self.linear_in.sharded_state_dict(f"{prefix}linear_in.", sharded_offsets, metadata)
        out = self.linear_out.sharded_state_dict(f"{prefix}linear_out.", sharded_offsets, metadata)
        if self.swiglu:
            key = f"{prefix}linear_out.weight"
            singleton = (metadata or {}).get("singleton_local_shards", False)
            out[key] = apply_swiglu_sharded_factory(out[key], sharded_offsets, singleton)
        state.update(out)
        if hasattr(self, "weight_magnitude"):
            key, value = f"{prefix}weight_magnitude", self.weight_magnitude
            if self.column:
                state[key] = make_tp_sharded_tensor_for_checkpoint(
                    value, key, 0, prepend_offsets=sharded_offsets, tp_group=self.tp_group
                )
            else:
                state[key] = make_sharded_tensor_for_checkpoint(
                    value, key, prepend_offsets=sharded_offsets, tp_group=self.tp_group
                )
        return state


class AdaptedLinear:
    """Mixed into an adapted linear's class: its output plus its adapter's, its saved entries plus
    the adapter's (split as :class:`LoRA` splits them, not as the linear's own)."""

    adapter: LoRA

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # a norm-fused linear (Transformer Engine's layout) multiplies its normed input, and so does
        # its adapter (as Megatron-Bridge's does); such a module says what that input is
        normed = getattr(self, "normed", None)
        if normed is None and hasattr(self, "layer_norm_weight"):
            raise BridgeError(
                f"{type(self).__name__}: a norm-fused linear without normed(x); its adapter's input is unknown"
            )
        out, bias = super().forward(x, *args, **kwargs)  # type: ignore[misc]
        return out + self.adapter(x if normed is None else normed(x)), bias

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple[Any, ...] = (), metadata: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)  # type: ignore[misc]
        state = {k: v for k, v in state.items() if not k.startswith(f"{prefix}adapter.")}
        state.update(self.adapter.sharded_state_dict(f"{prefix}adapter.", sharded_offsets, metadata))
        return state


_ADAPTED_CLASSES: dict[type, type] = {}


def split_dim(module: torch.nn.Module) -> int | None:
    """The dim along which ``module``'s 2-D ``weight`` is split over TP, if it is a linear that can
    carry a LoRA adapter: megatron-core's column-parallel linear keeping its output split (0), its
    row-parallel linear (1), or a family's own linear (a norm-fused one) that marks its weight with
    megatron-core's tensor-parallel attributes and has ``config`` and ``tp_group``."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, AdaptedLinear):
        return None
    if isinstance(module, RowParallelLinear):
        return 1
    if isinstance(module, ColumnParallelLinear):
        return None if module.gather_output else 0
    weight = getattr(module, "weight", None)
    if (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and getattr(weight, "tensor_model_parallel", False)
        and getattr(module, "tp_group", None) is not None
        and getattr(module, "config", None) is not None
    ):
        return getattr(weight, "partition_dim", None)
    return None


def adapt(chunks: list[torch.nn.Module], targets: Iterable[tuple[tuple[int, str], Adapted]]) -> None:
    """Put a LoRA adapter on each ((model chunk, local module name), adapter) of ``chunks``, in place.

    Only a module with a :func:`split_dim` carries one; anything else named here is refused with its name.
    """
    modules = [dict(chunk.named_modules()) for chunk in chunks]
    for (chunk, local), adapted in targets:
        base = modules[chunk].get(local)
        if base is None:
            raise BridgeError(f"{adapted.module}: no such module in the model to put an adapter on")
        dim = split_dim(base)
        if dim is None:
            raise BridgeError(
                f"{adapted.module}: a {type(base).__name__} cannot carry a LoRA adapter"
                " (a column-parallel linear with split output or a row-parallel linear can)"
            )
        swiglu = local.endswith("linear_fc1") and bool(base.config.gated_linear_unit)
        cls = type(base)
        if cls not in _ADAPTED_CLASSES:
            _ADAPTED_CLASSES[cls] = type(f"Adapted{cls.__name__}", (AdaptedLinear, cls), {})
        adapter = LoRA(base, dim == 0, adapted, swiglu)
        base.__class__ = _ADAPTED_CLASSES[cls]
        base.adapter = adapter
