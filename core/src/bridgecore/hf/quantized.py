"""Quantized HF checkpoints as input: detection from ``config.json``, and FP8 block-scaled weights
read dequantized.

The one quantization read is the FP8 block-scaled release format (DeepSeek-V3, Qwen3.5/3.6 ``-FP8``):
``config.json`` holds ``quantization_config`` ``{"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [bm, bn], "modules_to_not_convert": [...]}``
and each quantized ``<m>.weight`` [..., rows, cols] is ``float8_e4m3fn`` with a float
``<m>.weight_scale_inv`` [..., ceil(rows/bm), ceil(cols/bn)]: element (i, j) is
``weight[i, j] * weight_scale_inv[i // bm, j // bn]``. :class:`DequantizedReader` presents every
such weight as that product, computed in float32 and rounded once to the model's dtype (the order of
transformers' ``Fp8Dequantize``), and reads only the blocks a slice touches. Every other
quantization is refused by name, with what is supported.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from bridgecore.errors import BridgeError
from bridgecore.hf.reader import CheckpointReader, normalized_index

QUANTIZATION_KEY = "quantization_config"
#: ModelOpt's own description of a real-quant export, beside config.json.
MODELOPT_FILE = "hf_quant_config.json"
SCALE_SUFFIX = "weight_scale_inv"
SUPPORTED = 'FP8 block-scaled weights (quant_method "fp8", fmt "e4m3", float weight_scale_inv per block)'
#: the keys of an FP8 block quantization_config that bridgecore understands; any other is refused,
#: since it may change what the stored bytes mean
FP8_KEYS = frozenset(
    {"quant_method", "fmt", "activation_scheme", "weight_block_size", "modules_to_not_convert", "ignored_layers"}
)
#: keys transformers' FineGrainedFP8Config knows but whose formats are not read here, with the value
#: that means the plain format
FP8_PLAIN = {"scale_fmt": "float", "expert_dtype": "fp8"}
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class BlockFP8:
    """An FP8 block-scaled checkpoint's quantization: the block and the ``quantization_config`` as read."""

    #: the ``export --quant`` format that writes it again (bridgecore-quant)
    FORMAT: ClassVar[str] = "fp8-block"

    block: tuple[int, int]
    config: dict[str, Any]

    @classmethod
    def parse(cls, config: Any, where: str) -> BlockFP8:
        if not isinstance(config, dict):
            raise BridgeError(f"{where}: {QUANTIZATION_KEY} is {json.dumps(config)[:60]}; expected an object")
        method = config.get("quant_method")
        if method != "fp8":
            what = f'quant_method "{method}"' if isinstance(method, str) else f"{QUANTIZATION_KEY} without quant_method"
            raise BridgeError(f"{where}: {what} is not a quantization bridgecore reads; it reads {SUPPORTED}")
        unknown = sorted(k for k in config if k not in FP8_KEYS and config[k] != FP8_PLAIN.get(k, object()))
        if unknown:
            key = unknown[0]
            raise BridgeError(
                f"{where}: {QUANTIZATION_KEY}.{key} = {json.dumps(config[key])[:60]} is not understood; it may change"
                f" what the stored bytes mean, so the checkpoint is refused (bridgecore reads {SUPPORTED})"
            )
        if config.get("fmt", "e4m3") != "e4m3":
            raise BridgeError(f'{where}: {QUANTIZATION_KEY}.fmt "{config["fmt"]}"; bridgecore reads "e4m3" only')
        scheme = config.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise BridgeError(
                f'{where}: {QUANTIZATION_KEY}.activation_scheme "{scheme}" (static input scales) is not read;'
                ' expected "dynamic"'
            )
        block = config.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
            raise BridgeError(
                f"{where}: {QUANTIZATION_KEY}.weight_block_size is {json.dumps(block)}; expected two positive"
                " integers (per-tensor FP8 without blocks is not read)"
            )
        return cls((block[0], block[1]), dict(config))

    def scale_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        rows, cols = weight_shape[-2:]
        return (*weight_shape[:-2], math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1]))


def detect(
    hf_config: dict[str, Any], hf_dir: Path | None, dtypes: dict[str, torch.dtype], where: str
) -> BlockFP8 | None:
    """The checkpoint's quantization, from ``config.json`` (``hf_config``, top level or ``text_config``)
    and ModelOpt's ``hf_quant_config.json``; None when it is not quantized. ``dtypes`` are the tensors'
    dtypes: float8 tensors under a config that declares no quantization are refused (their codes are
    no weights without their scales)."""
    if hf_dir is not None and (Path(hf_dir) / MODELOPT_FILE).is_file():
        raise BridgeError(
            f"{Path(hf_dir) / MODELOPT_FILE}: a ModelOpt real-quant export (FP8 / NVFP4 with weight_scale and"
            f" input_scale) is not a format bridgecore reads; it reads {SUPPORTED}"
        )
    text = hf_config.get("text_config")
    holders = [hf_config, *([text] if isinstance(text, dict) else [])]
    found = [h[QUANTIZATION_KEY] for h in holders if h.get(QUANTIZATION_KEY) is not None]
    if not found:
        fp8 = next((name for name, dtype in dtypes.items() if str(dtype).startswith("torch.float8")), None)
        if fp8 is not None:
            raise BridgeError(
                f"{where}: declares no {QUANTIZATION_KEY}, but tensor {fp8!r} is {dtypes[fp8]}; a quantized"
                " weight is read only with the quantization that says what its bytes mean"
            )
        return None
    return BlockFP8.parse(found[0], where)


def without_quantization(hf_config: dict[str, Any]) -> dict[str, Any]:
    """``hf_config`` as the dequantized checkpoint's config.json: no ``quantization_config``."""
    out = {k: v for k, v in hf_config.items() if k != QUANTIZATION_KEY}
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = {k: v for k, v in out["text_config"].items() if k != QUANTIZATION_KEY}
    return out


def scale_name(weight: str) -> str:
    return weight.removesuffix("weight") + SCALE_SUFFIX


class DequantizedReader:
    """The checkpoint ``hf_dir`` of an FP8 block quantization as its dequantized model, with the
    interface of :class:`CheckpointReader`: each quantized weight reads as ``dtype`` with its scales
    applied, and the scales are hidden from :meth:`keys` (:meth:`scales` names them; :meth:`read`
    still returns one as stored).

    Every pairing is checked from the headers when the reader opens: each float8 tensor has a scale
    of the block grid's shape and a float dtype, each scale a float8 weight."""

    def __init__(self, hf_dir: Path, quantization: BlockFP8, dtype: torch.dtype):
        self.raw = CheckpointReader(hf_dir)
        self.hf_dir, self.quantization, self.target_dtype = self.raw.hf_dir, quantization, dtype
        self._scales = {scale_name(k): k for k in self.raw.keys() if self.raw.dtype(k) == torch.float8_e4m3fn}
        for name in self.raw.keys():
            self._check(name)
        if not self._scales:
            raise BridgeError(
                f"{self.hf_dir}: config.json declares FP8 blocks (quant_method fp8), but no tensor is float8_e4m3fn"
            )

    def _check(self, name: str) -> None:
        raw = self.raw
        where = f"{raw.file_of(name)}: tensor {name!r}"
        dtype, shape = raw.dtype(name), tuple(raw.shape(name))
        if name in self._scales:
            weight = self._scales[name]
            expected = self.quantization.scale_shape(tuple(raw.shape(weight)))
            if shape != expected:
                raise BridgeError(
                    f"{where}: shape {list(shape)}, but {weight!r} {list(raw.shape(weight))} in blocks of"
                    f" {list(self.quantization.block)} needs scales of shape {list(expected)}"
                )
            if dtype not in SCALE_DTYPES:
                raise BridgeError(f"{where}: {dtype}; expected float scales (float32, bfloat16 or float16)")
        elif name.endswith(SCALE_SUFFIX):
            weight = name.removesuffix(SCALE_SUFFIX) + "weight"
            raise BridgeError(
                f"{where}: a block scale, but {weight!r} is not a float8_e4m3fn weight of this checkpoint"
            )
        elif dtype == torch.float8_e4m3fn:
            if not name.endswith(".weight") or len(shape) < 2:
                raise BridgeError(f"{where}: float8_e4m3fn {list(shape)}; expected a quantized linear's .weight")
            if scale_name(name) not in raw:
                raise BridgeError(f"{where}: float8_e4m3fn without its block scales {scale_name(name)!r}")
        elif str(dtype).startswith("torch.float8"):
            raise BridgeError(f"{where}: {dtype}; an FP8 block checkpoint holds float8_e4m3fn weights only")

    def __enter__(self) -> DequantizedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.raw.close()

    @property
    def bytes_read(self) -> int:
        return self.raw.bytes_read

    def keys(self) -> list[str]:
        return [k for k in self.raw.keys() if k not in self._scales]

    def scales(self) -> list[str]:
        """The block scales, in checkpoint order."""
        return [k for k in self.raw.keys() if k in self._scales]

    def __contains__(self, name: str) -> bool:
        return name in self.raw

    def quantized(self, name: str) -> bool:
        return scale_name(name) in self._scales

    def shape(self, name: str) -> tuple[int, ...]:
        return self.raw.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.target_dtype if self.quantized(name) else self.raw.dtype(name)

    def file_of(self, name: str) -> Path:
        return self.raw.file_of(name)

    def nbytes(self, name: str) -> int:
        return (
            math.prod(self.shape(name)) * self.dtype(name).itemsize if self.quantized(name) else self.raw.nbytes(name)
        )

    def read(self, name: str, index: tuple[slice | int, ...] = ()) -> torch.Tensor:
        """``tensor[index]``; a quantized weight's from the blocks the slice touches, dequantized."""
        if not self.quantized(name):
            return self.raw.read(name, index)
        shape = tuple(self.shape(name))
        index = normalized_index(index, shape, f"{self.file_of(name)}: tensor {name!r}")
        full = [slice(i, i + 1) if isinstance(i, int) else i for i in index]
        full += [slice(0, size) for size in shape[len(full) :]]
        lead, (rows, cols) = full[:-2], full[-2:]
        (bm, bn) = self.quantization.block
        blocks = [slice(s.start // b, math.ceil(s.stop / b)) for s, b in ((rows, bm), (cols, bn))]
        covered = [slice(blocks[0].start * bm, min(blocks[0].stop * bm, shape[-2]))]
        covered.append(slice(blocks[1].start * bn, min(blocks[1].stop * bn, shape[-1])))
        values = dequantize_blocks(
            self.raw.read(name, (*lead, *covered)),
            self.raw.read(scale_name(name), (*lead, *blocks)),
            self.quantization.block,
            self.target_dtype,
        )
        values = values[..., rows.start - covered[0].start : rows.stop - covered[0].start, :]
        values = values[..., cols.start - covered[1].start : cols.stop - covered[1].start]
        dropped = [dim for dim, item in enumerate(index) if isinstance(item, int)]
        return values.reshape([n for dim, n in enumerate(values.shape) if dim not in dropped])


def dequantize_blocks(
    weight: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """``weight[..., i, j] * scales[..., i // bm, j // bn]`` in float32, rounded once to ``dtype``; the
    weight starts on a block boundary (its last block may be partial)."""
    rows, cols = weight.shape[-2:]
    spread = scales.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    spread = spread.repeat_interleave(block[1], dim=-1)[..., :cols]
    return (weight.float() * spread).to(dtype)
