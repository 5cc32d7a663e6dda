"""FP8 (E4M3) per-tensor and NVFP4 (E2M1, 16-wide blocks) quantization from calibrated amax, and
FP8 block-scaled quantization (the format of FP8 releases) from kept block scales.

The scales follow ModelOpt's deployable export: FP8 ``scale = amax / 448``; NVFP4
``scale_2 = amax / (6 * 448)``, per-block ``scale = block_amax / (6 * scale_2)`` stored as E4M3, and
the elements E2M1 rounded to nearest (ties to the even code), two per byte, low nibble first.
Leading dims are batch dims: a stacked ``[E, out, in]`` weight takes an ``[E]`` amax.
"""

from __future__ import annotations

import torch

from bridgecore.plugin import dequantize_blocks

E4M3_MAX = 448.0
E2M1_MAX = 6.0
NVFP4_BLOCK = 16
#: the E2M1 magnitudes of codes 0..7; code | 8 is the negative value.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_MIDPOINTS = (E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2
#: the smallest positive E4M3 subnormal: a block scale below it would store as 0.
_E4M3_TINY = 2.0**-9


def _per_leading(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    """An amax-shaped scale ([], [1] or [E]) broadcastable over a weight of ``ndim`` dims."""
    return scale.reshape(tuple(scale.shape) + (1,) * (ndim - scale.dim()))


def fp8_quantize(weight: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 weight, fp32 scale shaped like ``amax``); values beyond amax saturate at ±448.

    The division follows torch's type promotion as ModelOpt's export does: a bf16 weight over a
    0-dim fp32 scale (a ``[]`` amax) is divided in bf16, so the quotient is rounded to bf16 before
    E4M3; a ``[1]`` scale divides in fp32. A stacked ``[E, out, in]`` weight with an ``[E]`` amax is
    quantized expert by expert, each as ModelOpt's export quantizes one expert with its ``[]`` amax.
    """
    scale = amax.float() / E4M3_MAX
    if weight.dim() > 2 and scale.dim() == weight.dim() - 2 and scale.shape == weight.shape[:-2]:
        return torch.stack([fp8_quantize(w, a)[0] for w, a in zip(weight, amax, strict=True)]), scale
    scaled = weight / (scale if scale.dim() == 0 else _per_leading(scale, weight.dim()))
    return scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return weight.float() * _per_leading(scale.float(), weight.dim())


def _e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    magnitude = scaled.abs().clamp(max=E2M1_MAX)
    midpoints = _E2M1_MIDPOINTS.to(scaled.device)
    code = torch.bucketize(magnitude, midpoints)  # a value on a midpoint lands on the lower code
    on_midpoint = (magnitude.unsqueeze(-1) == midpoints).any(-1)
    code = code + (on_midpoint & (code % 2 == 1)).to(code.dtype)  # ...unless that code is odd: ties to even
    return (code | ((scaled < 0).to(code.dtype) << 3)).to(torch.uint8)


def nvfp4_quantize(weight: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 ``[..., in/2]``, E4M3 block scales ``[..., in/16]``, fp32 ``scale_2`` shaped like amax)."""
    scale_2 = amax.float() / (E2M1_MAX * E4M3_MAX)
    blocks = weight.float().unflatten(-1, (weight.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK))
    global_scale = _per_leading(scale_2, blocks.dim() - 1)
    block_scale = blocks.abs().amax(-1) / (E2M1_MAX * global_scale)
    # An all-zero block keeps scale 1 (any scale represents it); the clamp keeps E4M3 finite and non-zero.
    block_scale = torch.where(block_scale == 0, torch.ones_like(block_scale), block_scale)
    block_scale = block_scale.clamp(_E4M3_TINY, E4M3_MAX).to(torch.float8_e4m3fn)
    codes = _e2m1_codes(blocks / (block_scale.float() * global_scale).unsqueeze(-1)).flatten(-2)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, block_scale, scale_2


def nvfp4_dequantize(packed: torch.Tensor, block_scale: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2).long()
    values = E2M1_VALUES.to(packed.device)[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    blocks = values.unflatten(-1, (values.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK))
    scale = block_scale.float() * _per_leading(scale_2.float(), block_scale.dim())
    return (blocks * scale.unsqueeze(-1)).flatten(-2)


def _blocks(x: torch.Tensor, block: tuple[int, int], fill: float | bool) -> torch.Tensor:
    """``x`` [..., rows, cols] padded with ``fill`` to whole blocks, as [..., R, bm, C, bn]."""
    rows, cols = x.shape[-2:]
    pad_rows, pad_cols = -rows % block[0], -cols % block[1]
    padded = torch.nn.functional.pad(x, (0, pad_cols, 0, pad_rows), value=fill) if pad_rows or pad_cols else x
    return padded.unflatten(-1, (-1, block[1])).unflatten(-3, (-1, block[0]))


def _spread(scales: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    spread = scales.float().repeat_interleave(block[0], dim=-2)[..., : shape[-2], :]
    return spread.repeat_interleave(block[1], dim=-1)[..., : shape[-1]]


def fp8_block_quantize(
    weight: torch.Tensor, kept: torch.Tensor | None, block: tuple[int, int], scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 weight, block scales ``weight_scale_inv`` [..., ceil(rows/bm), ceil(cols/bn)] in ``scale_dtype``).

    A block whose values are exactly what its ``kept`` scale dequantizes to (the bridgecore reader's
    arithmetic: E4M3 times scale in float32, rounded to the weight's dtype) keeps that scale, so an
    unchanged import exports its release bit for bit; any other block (trained weights, or no kept
    scales) gets ``amax / 448`` of its own values, rounded to ``scale_dtype`` (an all-zero block: 1).
    Quotients saturate at ±448."""
    w = weight.float()
    amax = _blocks(w.abs(), block, 0.0).amax(dim=(-3, -1))
    fresh = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).to(scale_dtype)
    scales = fresh
    if kept is not None:
        codes = (w / _spread(kept, block, w.shape)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        same = dequantize_blocks(codes, kept, block, weight.dtype) == weight
        scales = torch.where(_blocks(same, block, True).all(dim=-3).all(dim=-1), kept.to(scale_dtype), fresh)
    codes = (w / _spread(scales, block, w.shape)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scales
