"""Quantized HF checkpoints as input: detection from ``config.json``, and FP8 weights read dequantized.

Three formats are read, each weight ``<m>.weight`` [..., rows, cols] in ``float8_e4m3fn`` with float
scales, element (i, j) being ``weight[i, j] * scale[i // bm, j // bn]`` for the format's block (bm, bn):

- FP8 block-scaled releases (DeepSeek-V3, Qwen3.5/3.6 ``-FP8``): ``quantization_config``
  ``{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [bm, bn]}``,
  scales ``<m>.weight_scale_inv`` [..., ceil(rows/bm), ceil(cols/bn)]; the product is computed in
  float32 and rounded once to the model's dtype (transformers' ``Fp8Dequantize``).
- compressed-tensors ``float-quantized`` FP8 (llm-compressor's ``FP8`` / ``FP8_DYNAMIC`` schemes):
  ``quant_method: compressed-tensors``, scales ``<m>.weight_scale`` per tensor ([1]), per output
  channel ([rows, 1]) or per block; the product is computed in the scale's dtype and then rounded to
  the model's (the library's ``dequantize``).
- ModelOpt FP8 exports (``hf_quant_config.json`` ``quant_algo: FP8``): per-tensor ``weight_scale``
  and ``input_scale``, FP8 KV cache scales; the product in float32. The scales are read as the amax
  they were made from (``*_quantizer._amax``), the calibration the quant plugin converts.

:class:`DequantizedReader` presents every such weight as that product and reads only the blocks a
slice touches. Every other quantization is refused by name, with what is supported.
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
SUPPORTED = (
    'FP8 weights with float scales: FP8 blocks (quant_method "fp8", weight_scale_inv), compressed-tensors'
    ' "float-quantized" (weight_scale per tensor, channel or block) and ModelOpt FP8 (per-tensor weight_scale)'
)
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _object(config: Any, where: str, key: str) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise BridgeError(f"{where}: {key} is {json.dumps(config)[:60]}; expected an object")
    return config


def _refuse_unknown(config: dict[str, Any], known: set[str], plain: dict[str, Any], where: str, key: str) -> None:
    """Refuse a key outside ``known`` unless it holds its ``plain`` value: it may change what the bytes mean."""
    unknown = sorted(k for k in config if k not in known and config[k] != plain.get(k, object()))
    if unknown:
        raise BridgeError(
            f"{where}: {key}.{unknown[0]} = {json.dumps(config[unknown[0]])[:60]} is not understood; it may change"
            f" what the stored bytes mean, so the checkpoint is refused (bridgecore reads {SUPPORTED})"
        )


def _block(value: Any, where: str, key: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(type(b) is int and b > 0 for b in value)):
        raise BridgeError(f"{where}: {key} is {json.dumps(value)}; expected two positive integers")
    return value[0], value[1]


def _grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    return (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))


@dataclass(frozen=True)
class Quantization:
    """A checkpoint's FP8 weight quantization: the ``quantization_config`` as read, and per format the
    scales' name, which blocks they scale, and the dtype the product is computed in."""

    #: the ``export --quant`` format that writes it again (bridgecore-quant), None when none does
    FORMAT: ClassVar[str | None] = None
    #: the suffix that names a weight's scales in place of ``weight``
    SCALE: ClassVar[str] = ""
    config: dict[str, Any]

    def block_of(self, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[int, int] | None:
        """The block each scale of ``weight_shape`` covers, or None when ``scale_shape`` is not one of its grids."""
        raise NotImplementedError

    def grids(self, weight_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The scale shapes this format allows for ``weight_shape``, for the error that names them."""
        raise NotImplementedError

    def compute_dtype(self, scale_dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def describe(self) -> str:
        raise NotImplementedError

    def renamed(self, name: str) -> str | None:
        """The calibration tensor (``*_quantizer._amax``) a scale tensor ``name`` is read as, for formats
        whose scales the quant plugin keeps as amax; None: the scale is kept as stored."""
        return None

    def scale_name(self, weight: str) -> str:
        return weight.removesuffix("weight") + self.SCALE


@dataclass(frozen=True)
class BlockFP8(Quantization):
    """FP8 block-scaled releases: ``weight_scale_inv`` per ``block``."""

    FORMAT: ClassVar[str | None] = "fp8-block"
    SCALE: ClassVar[str] = "weight_scale_inv"
    #: keys transformers' FineGrainedFP8Config knows, with the value that means the format read here
    PLAIN: ClassVar[dict[str, Any]] = {"scale_fmt": "float", "expert_dtype": "fp8"}
    KEYS: ClassVar[set[str]] = {
        "quant_method",
        "fmt",
        "activation_scheme",
        "weight_block_size",
        "modules_to_not_convert",
        "ignored_layers",
    }
    block: tuple[int, int] = (128, 128)

    @classmethod
    def parse(cls, config: Any, where: str) -> BlockFP8:
        config = _object(config, where, QUANTIZATION_KEY)
        _refuse_unknown(config, cls.KEYS, cls.PLAIN, where, QUANTIZATION_KEY)
        if config.get("fmt", "e4m3") != "e4m3":
            raise BridgeError(f'{where}: {QUANTIZATION_KEY}.fmt "{config["fmt"]}"; bridgecore reads "e4m3" only')
        scheme = config.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise BridgeError(
                f'{where}: {QUANTIZATION_KEY}.activation_scheme "{scheme}" (static input scales) is not read;'
                ' expected "dynamic"'
            )
        block = _block(config.get("weight_block_size"), where, f"{QUANTIZATION_KEY}.weight_block_size")
        return cls(dict(config), block)

    def block_of(self, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[int, int] | None:
        return self.block if tuple(scale_shape) == _grid(weight_shape, self.block) else None

    def grids(self, weight_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        return [_grid(weight_shape, self.block)]

    def scale_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        return _grid(weight_shape, self.block)

    def describe(self) -> str:
        scheme = self.config.get("activation_scheme", "dynamic")
        return (
            f"FP8 block-scaled (quant_method fp8, e4m3, blocks {self.block[0]}x{self.block[1]}, {scheme} activations)"
        )


@dataclass(frozen=True)
class CompressedFP8(Quantization):
    """compressed-tensors ``float-quantized`` FP8: ``weight_scale`` per tensor, output channel or block."""

    SCALE: ClassVar[str] = "weight_scale"
    KEYS: ClassVar[set[str]] = {
        "quant_method",
        "format",
        "quantization_status",
        "config_groups",
        "ignore",
        "global_compression_ratio",
        "version",
    }
    PLAIN: ClassVar[dict[str, Any]] = {
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "moe_sparsity_config": None,
        "transform_config": None,
    }
    #: the weight arguments that say nothing about the stored bytes (calibration settings), and those
    #: that must hold the value of the format read here
    WEIGHT_KEYS: ClassVar[set[str]] = {"num_bits", "type", "strategy", "block_structure", "observer", "observer_kwargs"}
    WEIGHT_PLAIN: ClassVar[dict[str, Any]] = {
        "symmetric": True,
        "dynamic": False,
        "group_size": None,
        "actorder": None,
        "zp_dtype": None,
        "scale_dtype": None,
    }
    STRATEGIES: ClassVar[tuple[str, ...]] = ("tensor", "channel", "block")
    #: the strategy of each config group's weights: "tensor", "channel", or a (bm, bn) block
    strategies: tuple[str | tuple[int, int], ...] = ()

    @classmethod
    def parse(cls, config: Any, where: str) -> CompressedFP8:
        key = QUANTIZATION_KEY
        config = _object(config, where, key)
        if config.get("format") != "float-quantized":
            raise BridgeError(
                f"{where}: compressed-tensors format {json.dumps(config.get('format'))} is not read; bridgecore reads"
                ' "float-quantized" (FP8 weights)'
            )
        _refuse_unknown(config, cls.KEYS, cls.PLAIN, where, key)
        if config.get("quantization_status", "compressed") != "compressed":
            raise BridgeError(
                f'{where}: {key}.quantization_status "{config["quantization_status"]}"; expected "compressed"'
                " (weights stored quantized)"
            )
        groups = _object(config.get("config_groups"), where, f"{key}.config_groups")
        strategies: list[str | tuple[int, int]] = []
        for name, group in groups.items():
            at = f"{key}.config_groups.{name}"
            group = _object(group, where, at)
            _refuse_unknown(
                group, {"targets", "weights", "input_activations", "format"}, {"output_activations": None}, where, at
            )
            if group.get("format") not in (None, "float-quantized"):  # None: the checkpoint's format
                raise BridgeError(f'{where}: {at}.format "{group["format"]}" is not read; expected "float-quantized"')
            inputs = group.get("input_activations")
            if inputs is not None and _object(inputs, where, f"{at}.input_activations").get("dynamic") is not True:
                raise BridgeError(
                    f"{where}: {at}.input_activations are static (input_scale tensors), which are not read;"
                    " expected dynamic activations"
                )
            weights = _object(group.get("weights"), where, f"{at}.weights")
            _refuse_unknown(weights, cls.WEIGHT_KEYS, cls.WEIGHT_PLAIN, where, f"{at}.weights")
            if (weights.get("num_bits"), weights.get("type")) != (8, "float"):
                raise BridgeError(
                    f"{where}: {at}.weights are {weights.get('num_bits')}-bit {weights.get('type')}; bridgecore reads"
                    " 8-bit float (FP8) weights"
                )
            strategy = weights.get("strategy")
            if strategy not in cls.STRATEGIES:
                raise BridgeError(
                    f"{where}: {at}.weights.strategy {json.dumps(strategy)};"
                    f" expected one of {', '.join(cls.STRATEGIES)}"
                )
            block = weights.get("block_structure")
            strategies.append(
                _block(block, where, f"{at}.weights.block_structure") if strategy == "block" else strategy
            )
        if not strategies:
            raise BridgeError(f"{where}: {key}.config_groups is empty; expected the FP8 weights' group")
        return cls(dict(config), tuple(strategies))

    def grids(self, weight_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        rows, cols = weight_shape[-2:]
        found = {
            "tensor": [(1,), ()],
            "channel": [(*weight_shape[:-2], rows, 1)],
        }
        out: list[tuple[int, ...]] = []
        for strategy in self.strategies:
            out += found[strategy] if isinstance(strategy, str) else [_grid(weight_shape, strategy)]
        return out

    def block_of(self, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[int, int] | None:
        rows, cols = weight_shape[-2:]
        for strategy in self.strategies:
            if strategy == "tensor" and tuple(scale_shape) in ((1,), ()) and len(weight_shape) == 2:
                return rows, cols
            if strategy == "channel" and tuple(scale_shape) == (*weight_shape[:-2], rows, 1):
                return 1, cols
            if isinstance(strategy, tuple) and tuple(scale_shape) == _grid(weight_shape, strategy):
                return strategy
        return None

    def compute_dtype(self, scale_dtype: torch.dtype) -> torch.dtype:
        return scale_dtype

    def describe(self) -> str:
        kinds = sorted(s if isinstance(s, str) else f"blocks {s[0]}x{s[1]}" for s in self.strategies)
        return f"FP8 compressed-tensors (float-quantized, e4m3, scales per {', '.join(kinds)}, dynamic activations)"


E4M3_MAX = 448.0


def amax_of(scale: torch.Tensor, name: str = "scale") -> torch.Tensor:
    """The float32 amax whose ``amax / 448`` (float32) is ``scale`` exactly, as ModelOpt's FP8 export
    divided one: ``scale * 448``, or where that rounds off, its neighbouring float. A scale that no
    float32 divides to (not one such an export wrote) is refused, naming ``name``."""
    target = scale.float()
    amax = target * E4M3_MAX
    for _ in range(2):
        quotient = amax / E4M3_MAX
        amax = torch.where(quotient < target, torch.nextafter(amax, amax + 1), amax)
        amax = torch.where(quotient > target, torch.nextafter(amax, amax - 1), amax)
    if not torch.equal(amax / E4M3_MAX, target):
        raise BridgeError(
            f"{name}: no float32 amax divides by 448 to its value; not a scale ModelOpt's FP8 export made"
        )
    return amax


@dataclass(frozen=True)
class ModelOptFP8(Quantization):
    """ModelOpt's FP8 real-quant export (``hf_quant_config.json`` ``quant_algo: FP8``): per-tensor
    ``weight_scale`` (``[E]`` for stacked experts) and ``input_scale``, and ``k_proj.k_scale`` /
    ``v_proj.v_scale`` of an FP8 KV cache. Read as the calibrated model the quant plugin converts:
    weights dequantized, each scale as the amax it was made from (``*_quantizer._amax``, the one
    float32 value whose ``/ 448`` is the scale), so ``export --quant fp8`` writes the scales again."""

    FORMAT: ClassVar[str | None] = "fp8"
    SCALE: ClassVar[str] = "weight_scale"
    #: hf_quant_config.json's ``quantization`` keys, and those of config.json's ``quantization_config``
    #: as newer ModelOpt writes it (``config_groups`` and ``kv_cache_scheme`` restate the algorithms)
    KEYS: ClassVar[set[str]] = {
        "quant_method",
        "quant_algo",
        "kv_cache_quant_algo",
        "exclude_modules",
        "ignore",
        "config_groups",
        "kv_cache_scheme",
        "producer",
    }
    RENAMES: ClassVar[dict[str, str]] = {
        ".weight_scale": ".weight_quantizer._amax",
        ".input_scale": ".input_quantizer._amax",
        ".k_proj.k_scale": ".k_bmm_quantizer._amax",
        ".v_proj.v_scale": ".v_bmm_quantizer._amax",
    }

    @classmethod
    def parse(cls, config: Any, where: str) -> ModelOptFP8:
        """``config``: hf_quant_config.json's ``quantization`` object, or config.json's ``quantization_config``
        with ``quant_method: modelopt``; the record says ``quant_method: modelopt`` either way."""
        config = {"quant_method": "modelopt", **_object(config, where, "quantization")}
        algo = config.get("quant_algo")
        if algo != "FP8":
            raise BridgeError(
                f"{where}: ModelOpt quant_algo {json.dumps(algo)} is not read; bridgecore reads ModelOpt's per-tensor"
                ' "FP8" (it writes NVFP4 with --quant nvfp4 but does not read it yet)'
            )
        _refuse_unknown(config, cls.KEYS, {}, where, "quantization")
        kv = config.get("kv_cache_quant_algo")
        if kv not in (None, "FP8"):
            raise BridgeError(f"{where}: ModelOpt kv_cache_quant_algo {json.dumps(kv)}; expected FP8 or null")
        return cls(dict(config))

    def block_of(self, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[int, int] | None:
        lead = tuple(weight_shape[:-2])
        if tuple(scale_shape) in ((), (1,)) and not lead or lead and tuple(scale_shape) == lead:
            return tuple(weight_shape[-2:])  # type: ignore[return-value]
        return None

    def grids(self, weight_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        lead = tuple(weight_shape[:-2])
        return [lead] if lead else [(), (1,)]

    def describe(self) -> str:
        kv = ", FP8 KV cache" if self.config.get("kv_cache_quant_algo") == "FP8" else ""
        return f"ModelOpt FP8 (per-tensor weight and input scales{kv})"

    def renamed(self, name: str) -> str | None:
        suffix = next((s for s in self.RENAMES if name.endswith(s)), None)
        return None if suffix is None else name.removesuffix(suffix) + self.RENAMES[suffix]


#: the ``quant_method`` values read, and their parsers
METHODS = {"fp8": BlockFP8.parse, "compressed-tensors": CompressedFP8.parse, "modelopt": ModelOptFP8.parse}


def parse(config: Any, where: str) -> Quantization:
    """The quantization ``config`` (a ``quantization_config``) describes, or a one-line refusal."""
    method = _object(config, where, QUANTIZATION_KEY).get("quant_method")
    if method not in METHODS:
        what = f'quant_method "{method}"' if isinstance(method, str) else f"{QUANTIZATION_KEY} without quant_method"
        raise BridgeError(f"{where}: {what} is not a quantization bridgecore reads; it reads {SUPPORTED}")
    return METHODS[method](config, where)


def detect(
    hf_config: dict[str, Any], hf_dir: Path | None, dtypes: dict[str, torch.dtype], where: str
) -> Quantization | None:
    """The checkpoint's quantization, from ``config.json`` (``hf_config``, top level or ``text_config``)
    and ModelOpt's ``hf_quant_config.json``; None when it is not quantized. ``dtypes`` are the tensors'
    dtypes: float8 tensors under a config that declares no quantization are refused (their codes are
    no weights without their scales)."""
    modelopt = Path(hf_dir) / MODELOPT_FILE if hf_dir is not None else None
    if modelopt is not None and modelopt.is_file():
        try:
            document = json.loads(modelopt.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BridgeError(f"{modelopt}: not valid JSON ({err})") from None
        return ModelOptFP8.parse(_object(document, str(modelopt), MODELOPT_FILE).get("quantization"), str(modelopt))
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
    return parse(found[0], where)


def without_quantization(hf_config: dict[str, Any]) -> dict[str, Any]:
    """``hf_config`` as the dequantized checkpoint's config.json: no ``quantization_config``."""
    out = {k: v for k, v in hf_config.items() if k != QUANTIZATION_KEY}
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = {k: v for k, v in out["text_config"].items() if k != QUANTIZATION_KEY}
    return out


class DequantizedReader:
    """The checkpoint ``hf_dir`` of an FP8 quantization as its dequantized model, with the interface of
    :class:`CheckpointReader`: each quantized weight reads as ``dtype`` with its scales applied, and the
    scales are hidden from :meth:`keys` (:meth:`scales` names them; :meth:`read` still returns one as
    stored).

    Every pairing is checked from the headers when the reader opens: each float8 tensor has a scale
    of one of the format's grids and a float dtype, each scale a float8 weight."""

    def __init__(self, hf_dir: Path, quantization: Quantization, dtype: torch.dtype):
        self.raw = CheckpointReader(hf_dir)
        self.hf_dir, self.quantization, self.target_dtype = self.raw.hf_dir, quantization, dtype
        q = quantization
        weights = [k for k in self.raw.keys() if self.raw.dtype(k) == torch.float8_e4m3fn and k.endswith(".weight")]
        self._scales = {q.scale_name(k): k for k in weights}
        #: the block of each quantized weight
        self._blocks: dict[str, tuple[int, int]] = {}
        #: the amax each scale the quantization keeps as calibration is read as: amax name -> scale name
        self._amax = {q.renamed(k): k for k in self.raw.keys() if q.renamed(k)}
        self._renamed = {v: k for k, v in self._amax.items()}
        for name in self.raw.keys():
            self._check(name)
        if not self._scales:
            raise BridgeError(f"{self.hf_dir}: config.json declares {q.describe()}, but no weight is float8_e4m3fn")

    def _check(self, name: str) -> None:
        raw, q = self.raw, self.quantization
        where = f"{raw.file_of(name)}: tensor {name!r}"
        dtype, shape = raw.dtype(name), tuple(raw.shape(name))
        if name in self._scales:
            weight = self._scales[name]
            weight_shape = tuple(raw.shape(weight))
            block = q.block_of(weight_shape, shape) if len(weight_shape) >= 2 else None
            if block is None:
                grids = " or ".join(str(list(g)) for g in q.grids(weight_shape)) if len(weight_shape) >= 2 else "none"
                raise BridgeError(
                    f"{where}: shape {list(shape)}, but {weight!r} {list(weight_shape)} needs scales of shape {grids}"
                )
            if dtype not in SCALE_DTYPES:
                raise BridgeError(f"{where}: {dtype}; expected float scales (float32, bfloat16 or float16)")
            self._blocks[weight] = block
        elif name.endswith("." + q.SCALE):
            weight = name.removesuffix(q.SCALE) + "weight"
            raise BridgeError(
                f"{where}: a weight scale, but {weight!r} is not a float8_e4m3fn weight of this checkpoint"
            )
        elif name in self._renamed:
            if dtype not in SCALE_DTYPES:
                raise BridgeError(f"{where}: {dtype}; expected a float scale")
            weight = name.rpartition(".")[0] + ".weight"
            if name.endswith(".input_scale") and weight not in self._scales.values():
                raise BridgeError(f"{where}: an input scale, but {weight!r} is not a float8_e4m3fn weight")
        elif dtype == torch.float8_e4m3fn:
            if not name.endswith(".weight") or len(shape) < 2:
                raise BridgeError(f"{where}: float8_e4m3fn {list(shape)}; expected a quantized linear's .weight")
            if q.scale_name(name) not in raw:
                raise BridgeError(f"{where}: float8_e4m3fn without its scales {q.scale_name(name)!r}")
        elif str(dtype).startswith("torch.float8"):
            raise BridgeError(f"{where}: {dtype}; an FP8 checkpoint holds float8_e4m3fn weights only")

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
        """The dequantized model's tensors: each scale kept as calibration under its amax name (in its
        place), the others left out, every other tensor as stored."""
        return [self._renamed.get(k, k) for k in self.raw.keys() if k not in self._scales or k in self._renamed]

    def scales(self) -> list[str]:
        """The weight scales kept as stored (not as amax), in checkpoint order."""
        return [k for k in self.raw.keys() if k in self._scales and k not in self._renamed]

    def weights(self) -> list[str]:
        """The quantized weights, in checkpoint order."""
        return list(self._blocks)

    def __contains__(self, name: str) -> bool:
        return name in self.raw or name in self._amax

    def quantized(self, name: str) -> bool:
        return name in self._blocks

    def _source(self, name: str) -> str:
        return self._amax.get(name, name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.raw.shape(self._source(name))

    def dtype(self, name: str) -> torch.dtype:
        if name in self._amax:
            return torch.float32
        return self.target_dtype if self.quantized(name) else self.raw.dtype(name)

    def file_of(self, name: str) -> Path:
        return self.raw.file_of(self._source(name))

    def nbytes(self, name: str) -> int:
        if self.quantized(name) or name in self._amax:
            return math.prod(self.shape(name)) * self.dtype(name).itemsize
        return self.raw.nbytes(name)

    def read(self, name: str, index: tuple[slice | int, ...] = ()) -> torch.Tensor:
        """``tensor[index]``; a quantized weight's from the blocks the slice touches, dequantized; an amax
        from its scale."""
        if name in self._amax:
            source = self._amax[name]
            return amax_of(self.raw.read(source, ()), f"{self.file_of(name)}: tensor {source!r}")[index]
        if not self.quantized(name):
            return self.raw.read(name, index)
        shape, (bm, bn) = tuple(self.shape(name)), self._blocks[name]
        index = normalized_index(index, shape, f"{self.file_of(name)}: tensor {name!r}")
        full = [slice(i, i + 1) if isinstance(i, int) else i for i in index]
        full += [slice(0, size) for size in shape[len(full) :]]
        lead, (rows, cols) = full[:-2], full[-2:]
        blocks = [slice(s.start // b, math.ceil(s.stop / b)) for s, b in ((rows, bm), (cols, bn))]
        covered = [slice(blocks[0].start * bm, min(blocks[0].stop * bm, shape[-2]))]
        covered.append(slice(blocks[1].start * bn, min(blocks[1].stop * bn, shape[-1])))
        scale = self.quantization.scale_name(name)
        grid = _grid(shape, (bm, bn))
        if tuple(self.raw.shape(scale)) == grid:
            scales = self.raw.read(scale, (*lead, *blocks))
        else:  # one scale for the tensor, stored as [1] or []
            scales = self.raw.read(scale, ()).reshape(grid)[(*lead, *blocks)]
        values = dequantize_blocks(
            self.raw.read(name, (*lead, *covered)),
            scales,
            (bm, bn),
            self.target_dtype,
            self.quantization.compute_dtype(scales.dtype),
        )
        values = values[..., rows.start - covered[0].start : rows.stop - covered[0].start, :]
        values = values[..., cols.start - covered[1].start : cols.stop - covered[1].start]
        dropped = [dim for dim, item in enumerate(index) if isinstance(item, int)]
        return values.reshape([n for dim, n in enumerate(values.shape) if dim not in dropped])


#: rows dequantized per step: the float32 temporaries stay this many rows, whatever the tensor's size
ROWS_PER_STEP = 256


def dequantize_blocks(
    weight: torch.Tensor,
    scales: torch.Tensor,
    block: tuple[int, int],
    dtype: torch.dtype,
    compute: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``weight[..., i, j] * scales[..., i // bm, j // bn]`` computed in ``compute``, rounded once to
    ``dtype``; the weight starts on a block boundary (its last block may be partial). Computed
    :data:`ROWS_PER_STEP` rows at a time into the result, so no temporary is larger than that."""
    rows, cols = weight.shape[-2:]
    flat_weight, flat_scales = weight.reshape(-1, cols), scales.reshape(-1, scales.shape[-1])
    out = torch.empty(weight.shape, dtype=dtype)
    flat_out = out.view(-1, cols)
    per_matrix, col_scale = scales.shape[-2], torch.arange(cols) // block[1]
    for start in range(0, flat_weight.shape[0], ROWS_PER_STEP):
        stop = min(start + ROWS_PER_STEP, flat_weight.shape[0])
        flat_rows = torch.arange(start, stop)  # row i of matrix m: scale row m * per_matrix + i // bm
        spread = flat_scales[flat_rows // rows * per_matrix + flat_rows % rows // block[0]][:, col_scale]
        flat_out[start:stop] = (flat_weight[start:stop].to(compute) * spread.to(compute)).to(dtype)
    return out
