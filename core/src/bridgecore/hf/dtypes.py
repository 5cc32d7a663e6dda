"""The safetensors dtype codes: their bit widths, their torch dtypes, and the order files use."""

from __future__ import annotations

import torch

from bridgecore.errors import BridgeError

#: Every dtype code safetensors knows, with its width in bits, in the order of safetensors' own
#: `Dtype` enum. `save_file` lays tensors out by this order, widest first, then by name; the writer
#: follows it to produce the same bytes.
BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

# Sub-byte codes (F4, F6_*) are packed; bridgecore validates them but does not read or write them.
TORCH_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "C64": torch.complex64,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}

_CODES = {dtype: code for code, dtype in TORCH_DTYPES.items()}
_ORDER = {code: rank for rank, code in enumerate(BITS)}


def code_of(dtype: torch.dtype, where: str) -> str:
    """The safetensors code of a torch dtype; `where` names the tensor for the error."""
    if dtype not in _CODES:
        raise BridgeError(f"{where}: dtype {dtype} has no safetensors code; expected one of {sorted(map(str, _CODES))}")
    return _CODES[dtype]


def layout_rank(code: str) -> int:
    """Position of `code` in safetensors' enum; files hold higher ranks first."""
    return _ORDER[code]


def data_bytes(code: str, shape: tuple[int, ...]) -> int | None:
    """Bytes of a tensor of this code and shape, or None when its bits do not fill whole bytes."""
    bits = BITS[code]
    for size in shape:
        bits *= size
    return bits // 8 if bits % 8 == 0 else None
