"""Exact dtype casts: every conversion casts between the checkpoint's and the params' dtypes only
where no value changes, comparing floating-point values bit for bit."""

from __future__ import annotations

import torch

from bridgecore.errors import BridgeError


def exact_cast(tensor: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """``tensor`` in ``dtype``, or an error if that cast would change any value. Floating-point values
    are compared as bits, so a NaN keeps its sign and payload and -0.0 stays -0.0."""
    if tensor.dtype == dtype or tensor.is_meta:
        return tensor.to(dtype)
    cast = _cast(tensor, dtype)
    back = _cast(cast, tensor.dtype)
    same = _as_bits(back) == _as_bits(tensor) if tensor.is_floating_point() else back == tensor
    if not bool(same.all()):
        raise BridgeError(
            f"{what}: casting {tensor.dtype} to {dtype} would change values;"
            f" keep Megatron params in {tensor.dtype} (--params-dtype)"
        )
    return cast


#: a signed integer dtype of each element size, to compare floating-point values bit for bit.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(_BITS[tensor.element_size()])


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, but float32 -> bfloat16 keeps the upper half of each value's bits: torch
    rounds every NaN to 0xFFFF, losing its sign and payload, where an exact cast has nothing to round."""
    if tensor.dtype == torch.float32 and dtype == torch.bfloat16:
        return (_as_bits(tensor) >> 16).to(torch.int16).view(torch.bfloat16)
    return tensor.to(dtype)
