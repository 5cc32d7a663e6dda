"""The FP8 and NVFP4 weights pinned against the formats' own definitions, not against our decoder.

A round trip through our own pack and unpack cannot see a bug made in both (nibbles in the other
order, codes mirrored). Here a weight whose every value the format represents exactly is quantized
by the plugin and read back by a decoder written in this file from the specifications: OCP
Microscaling (MX) v1.0 FP4 E2M1 (sign bit 3, exponent bits 2-1 with bias 1, mantissa bit 0;
exponent 0 is subnormal: 0.5 x mantissa), NVIDIA's NVFP4 (blocks of 16 along the row, an E4M3 scale
per block times one fp32 scale per tensor, two elements per byte, the first in the low nibble), and
FP8 E4M3 read by torch. Every value must come back exactly, at its place.
"""

from __future__ import annotations

import itertools

import torch

from bridgecore_quant import numerics


def e2m1(code: int) -> float:
    """One FP4 E2M1 code's value, from the MX specification's bit layout."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 0b1
    if exponent == 0:
        return sign * 0.5 * mantissa
    return sign * 2.0 ** (exponent - 1) * (1 + mantissa / 2)


def decode_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, scale_2: float) -> list[list[float]]:
    """Row by row, byte by byte: low nibble, then high nibble; each block of 16 times its scale."""
    rows = []
    for r in range(packed.shape[0]):
        values = []
        for byte in packed[r].tolist():
            values += [e2m1(byte & 0x0F), e2m1(byte >> 4)]
        scales = block_scale[r].float().tolist()
        rows.append([v * scales[i // 16] * scale_2 for i, v in enumerate(values)])
    return rows


def test_the_e2m1_table_is_the_specifications() -> None:
    assert [e2m1(c) for c in range(8)] == numerics.E2M1_VALUES.tolist()
    assert [e2m1(c | 8) for c in range(1, 8)] == [-v for v in numerics.E2M1_VALUES.tolist()[1:]]


def test_nvfp4_packs_every_code_at_its_place() -> None:
    """Every E2M1 value, in every position of a block, under block scales 2^-2..2^3: exact."""
    grid = [e2m1(c) for c in range(16)]
    rows = []
    for shift, j in itertools.product(range(16), range(-2, 4)):
        # each block holds 6 (so its scale is exactly 2^j) and the 16 codes rotated by `shift`
        block = [grid[(i + shift) % 16] for i in range(16)]
        block[(shift + 7) % 16] = 6.0
        rows.append([v * 2.0**j for v in block] * 2)
    weight = torch.tensor(rows, dtype=torch.float32)
    amax = torch.tensor(6.0 * 448.0)  # scale_2 = 1: the block scales carry the powers of two
    packed, block_scale, scale_2 = numerics.nvfp4_quantize(weight.to(torch.bfloat16), amax)
    assert packed.dtype == torch.uint8 and packed.shape == (len(rows), 16)
    assert block_scale.dtype == torch.float8_e4m3fn and block_scale.shape == (len(rows), 2)
    assert scale_2.item() == 1.0
    assert decode_nvfp4(packed, block_scale, scale_2.item()) == rows


def test_nvfp4_first_element_is_the_low_nibble() -> None:
    weight = torch.zeros(1, 16)
    weight[0, 0], weight[0, 1] = 6.0, -0.5  # codes 0b0111 and 0b1001
    packed, _, _ = numerics.nvfp4_quantize(weight, torch.tensor(6.0 * 448.0))
    assert packed[0, 0].item() == 0b1001_0111


def test_fp8_weights_are_e4m3_of_weight_over_amax_448() -> None:
    """E4M3 values times the scale amax/448 give back a weight made of E4M3 values exactly."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = codes[codes.isfinite()]
    weight = (finite.reshape(1, -1) * 0.25).to(torch.bfloat16)  # scale 0.25: amax = 448 * 0.25
    quantized, scale = numerics.fp8_quantize(weight, torch.tensor(448.0 * 0.25))
    assert scale.item() == 0.25 and quantized.dtype == torch.float8_e4m3fn
    assert torch.equal(quantized.float() * 0.25, weight.float())
