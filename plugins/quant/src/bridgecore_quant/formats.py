"""Deployable checkpoints from a calibrated HF checkpoint: ``bridgecore export --quant fp8|nvfp4``,
and the FP8 block format of FP8 releases: ``--quant fp8-block`` (see :func:`export_fp8_block`).

The source is an HF checkpoint whose quantized linears ``<m>`` carry ``<m>.weight_quantizer._amax``
and ``<m>.input_quantizer._amax`` (what bridgecore exports from a Megatron model with quantizer
state). Each such ``<m>`` becomes, as ModelOpt's unified HF export writes it:

- FP8: ``weight`` E4M3, ``weight_scale`` = amax/448, ``input_scale`` = input amax/448;
- NVFP4: ``weight`` uint8 (two E2M1 per byte), ``weight_scale`` E4M3 per 16 inputs,
  ``weight_scale_2`` = amax/(6·448), ``input_scale`` = input amax/(6·448).

Scales keep the amax's shape (``[]``, ``[1]``, or ``[E]`` for stacked experts). ``k_bmm`` /
``v_bmm`` amax become an FP8 KV cache: ``<attn>.k_proj.k_scale`` = amax/448 (and ``v``). Every other
tensor is copied unchanged; modules with a weight but no quantizer are listed in ``exclude_modules``.
The conversion streams: the output is planned from shapes, then one source tensor at a time is read,
converted and written by the core's ``ShardedWriter``, which makes the output appear only when whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bridgecore.plugin import (
    DEFAULT_MAX_SHARD_SIZE,
    BlockFP8,
    BridgeError,
    CheckpointReader,
    ShardedWriter,
    check_target,
    copy_side_files,
)
from bridgecore_quant import numerics
from bridgecore_quant.amax import (
    INPUT_AMAX,
    KV_AMAX,
    WEIGHT_AMAX,
    is_per_tensor,
    module_of,
)

PRODUCER = {"name": "bridgecore-quant", "version": "0.4.0"}
#: what names an FP8 block release's scales (``<m>.weight_scale_inv``)
BLOCK_SCALE = ".weight_scale_inv"
_KV_SCALE = {KV_AMAX[0]: "k_proj.k_scale", KV_AMAX[1]: "v_proj.v_scale"}

Tensors = Iterator[tuple[str, torch.Tensor]]
Planned = Iterator[tuple[str, tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class _Amax:
    """Where one quantized module's amax are.

    ``weight`` names its weight amax; ``input`` its input amax. With ``per_expert``, the module is a
    stacked ``[E, out, in]`` weight whose experts ModelOpt calibrated as transformers' fused experts:
    ``weight`` names each expert's amax in expert order (read stacked, ``[E]``), and ``input`` the one
    input amax every expert of the layer reads (read as ``[E]`` copies: ModelOpt gives each expert its
    own ``input_scale``).
    """

    weight: tuple[str, ...]
    input: str
    per_expert: bool = False

    def shapes(self, reader: CheckpointReader) -> tuple[tuple[int, ...], tuple[int, ...]]:
        weight, inputs = tuple(reader.shape(self.weight[0])), tuple(reader.shape(self.input))
        return ((len(self.weight), *weight), (len(self.weight), *inputs)) if self.per_expert else (weight, inputs)

    def read(self, reader: CheckpointReader) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = reader.read(self.input, ())
        if not self.per_expert:
            return reader.read(self.weight[0], ()), inputs
        weight = torch.stack([reader.read(name, ()) for name in self.weight])
        return weight, inputs.expand(len(self.weight), *inputs.shape).clone()


def _check_amax(name: str, amax: torch.Tensor, weight_shape: tuple[int, ...]) -> None:
    batch = len(weight_shape) - 2  # the expert dim of a stacked weight
    stacked = batch > 0 and tuple(amax.shape[:batch]) == weight_shape[:-2] and is_per_tensor(amax.shape[batch:])
    if not (is_per_tensor(amax.shape) or stacked):
        raise BridgeError(
            f"{name}: shape {list(amax.shape)}; FP8/NVFP4 export needs a per-tensor amax ([] or [1], [E] for"
            f" stacked experts), not a per-channel or per-block one"
        )
    if not bool((amax > 0).all()):
        raise BridgeError(f"{name}: amax {amax.flatten().tolist()} is not positive; the quantizer was never calibrated")


def _fp8(reader: CheckpointReader, module: str, amax: torch.Tensor, input_amax: torch.Tensor) -> Tensors:
    q, scale = numerics.fp8_quantize(reader.read(f"{module}.weight", ()), amax)
    yield f"{module}.weight", q
    yield f"{module}.weight_scale", scale
    yield f"{module}.input_scale", input_amax.float() / numerics.E4M3_MAX


def _fp8_plan(module: str, weight: tuple[int, ...], amax: tuple[int, ...], input_amax: tuple[int, ...]) -> Planned:
    yield f"{module}.weight", weight, torch.float8_e4m3fn
    yield f"{module}.weight_scale", amax, torch.float32
    yield f"{module}.input_scale", input_amax, torch.float32


def _nvfp4(reader: CheckpointReader, module: str, amax: torch.Tensor, input_amax: torch.Tensor) -> Tensors:
    packed, block_scale, scale_2 = numerics.nvfp4_quantize(reader.read(f"{module}.weight", ()), amax)
    yield f"{module}.weight", packed
    yield f"{module}.weight_scale", block_scale
    yield f"{module}.weight_scale_2", scale_2
    yield f"{module}.input_scale", input_amax.float() / (numerics.E2M1_MAX * numerics.E4M3_MAX)


def _nvfp4_plan(module: str, weight: tuple[int, ...], amax: tuple[int, ...], input_amax: tuple[int, ...]) -> Planned:
    if weight[-1] % numerics.NVFP4_BLOCK:
        raise BridgeError(
            f"{module}.weight: {weight[-1]} input features do not split into NVFP4 blocks of {numerics.NVFP4_BLOCK}"
        )
    yield f"{module}.weight", (*weight[:-1], weight[-1] // 2), torch.uint8
    yield f"{module}.weight_scale", (*weight[:-1], weight[-1] // numerics.NVFP4_BLOCK), torch.float8_e4m3fn
    yield f"{module}.weight_scale_2", amax, torch.float32
    yield f"{module}.input_scale", input_amax, torch.float32


_QUANTIZERS: dict[str, Callable[[CheckpointReader, str, torch.Tensor, torch.Tensor], Tensors]] = {
    "fp8": _fp8,
    "nvfp4": _nvfp4,
}
_PLANS: dict[str, Callable[[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], Planned]] = {
    "fp8": _fp8_plan,
    "nvfp4": _nvfp4_plan,
}
_ALGO = {"fp8": "FP8", "nvfp4": "NVFP4"}
#: HF linears that read one input tensor, by their leaf names under one parent. ModelOpt's NVFP4
#: export finds such groups with a forward pass and gives each member the group's max weight and
#: input amax (its FP8 export keeps every linear's own).
SHARED_INPUT = (
    frozenset({"q_proj", "k_proj", "v_proj", "g_proj"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"}),
)


#: ModelOpt's weight amax of one expert of transformers' fused experts (``<experts>.<fused>`` ``[E, ...]``).
_FUSED_EXPERT_AMAX = re.compile(
    r"(?P<experts>.+\.experts)\.(?P<fused>[a-z_]+)_weight_quantizers\.(?P<expert>\d+)\._amax"
)


#: the decoder layer a module belongs to: ``model.layers.3`` of ``model.layers.3.mlp.experts``.
_LAYER = re.compile(r".*\.layers\.\d+")


def _stacked_weight(reader: CheckpointReader, keys: list[str], experts: str, leaf: str, amax: dict[int, str]) -> str:
    """The stacked ``[E, out, in]`` weight of the layer of ``experts`` that holds the ``leaf``
    projection of its experts (``model.layers.3.moe.gate_proj`` for ``model.layers.3.mlp.experts``:
    Step-3.7's released layout, which transformers reads with renaming while ModelOpt names the amax
    after the in-memory module)."""
    example = amax[min(amax)]
    layer = _LAYER.match(experts)
    prefix = f"{layer[0]}." if layer else None
    found = [
        module_of(k)
        for k in keys
        if prefix and k.startswith(prefix) and k.endswith(f".{leaf}.weight") and len(reader.shape(k)) == 3
    ]
    if len(found) != 1:
        raise BridgeError(
            f"{example}: amax of transformers' fused experts, but the checkpoint has neither per-expert"
            f" {experts}.{{e}}.{leaf}.weight nor one stacked [experts, out, in] {leaf}.weight in the same layer"
            + (f" (found {found})" if found else "")
        )
    count = reader.shape(f"{found[0]}.weight")[0]
    if sorted(amax) != list(range(count)):
        raise BridgeError(
            f"{example}: amax for experts {sorted(amax)}, but the stacked {found[0]}.weight holds {count} experts"
        )
    return found[0]


def _quantized_modules(reader: CheckpointReader, keys: list[str]) -> dict[str, _Amax]:
    """Where each quantized module's amax are.

    ``<m>.weight_quantizer._amax`` and ``<m>.input_quantizer._amax``. For transformers' fused experts,
    as ModelOpt names their amax: the expert's ``<experts>.gate_up_proj_weight_quantizers.<e>._amax``
    (gate and up share it) and the layer's one ``<experts>.gate_up_proj_input_quantizer._amax``
    (``down_proj`` alike), for the per-expert projections ``<experts>.<e>.{gate,up}_proj`` or, where
    the checkpoint stores the experts stacked, for the layer's stacked ``gate_proj`` / ``up_proj``.
    """
    out: dict[str, _Amax] = {}
    fused: dict[tuple[str, str], dict[int, str]] = {}
    for key in keys:
        if key.endswith(f".{WEIGHT_AMAX}"):
            module = module_of(module_of(key))
            out[module] = _Amax((key,), f"{module}.{INPUT_AMAX}")
        elif found := _FUSED_EXPERT_AMAX.fullmatch(key):
            fused.setdefault((found["experts"], found["fused"]), {})[int(found["expert"])] = key
    present = set(keys)
    for (experts, name), amax in sorted(fused.items()):
        inputs = f"{experts}.{name}_input_quantizer._amax"
        for leaf in ("gate_proj", "up_proj") if name == "gate_up_proj" else (name,):
            if all(f"{experts}.{e}.{leaf}.weight" in present for e in amax):
                out |= {f"{experts}.{e}.{leaf}": _Amax((key,), inputs) for e, key in amax.items()}
                continue
            stacked = _stacked_weight(reader, keys, experts, leaf, amax)
            if stacked in out:
                raise BridgeError(f"{out[stacked].weight[0]}: {stacked} also has amax of transformers' fused experts")
            out[stacked] = _Amax(tuple(amax[e] for e in sorted(amax)), inputs, per_expert=True)
    for module, amax in sorted(out.items()):
        if f"{module}.weight" not in present:
            raise BridgeError(f"{amax.weight[0]}: the checkpoint has no {module}.weight to quantize")
        if amax.input not in present:
            raise BridgeError(f"{amax.input}: missing; weight-and-activation formats need the input amax too")
    return out


def shared_input_groups(quantized: Collection[str]) -> list[list[str]]:
    """The quantized modules grouped by the input they read (see :data:`SHARED_INPUT`), sorted."""
    groups: dict[tuple[str, int], list[str]] = {}
    for module in sorted(quantized):
        parent, _, leaf = module.rpartition(".")
        kind = next((i for i, names in enumerate(SHARED_INPUT) if leaf in names), -1)
        groups.setdefault((parent if kind >= 0 else module, kind), []).append(module)
    return list(groups.values())


def resolved_amax(
    reader: CheckpointReader, fmt: str, quantized: dict[str, _Amax]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(weight amax, input amax) each quantized module is exported with: its own for FP8, its
    shared-input group's max for NVFP4, as ModelOpt's exporter does."""
    own = {m: amax.read(reader) for m, amax in quantized.items()}
    if fmt != "nvfp4":
        return own
    out = {}
    for group in shared_input_groups(quantized):
        weight = torch.stack([own[m][0].float() for m in group]).amax(0)
        inputs = torch.stack([own[m][1].float() for m in group]).amax(0)
        out |= {m: (weight.to(own[m][0].dtype), inputs.to(own[m][1].dtype)) for m in group}
    return out


def _kv_scale(key: str) -> str | None:
    """``<attn>.k_proj.k_scale`` for ``<attn>.k_bmm_quantizer._amax`` (and ``v``); None for other keys."""
    suffix = next((s for s in KV_AMAX if key.endswith("." + s)), None)
    return None if suffix is None else f"{key[: -len(suffix) - 1]}.{_KV_SCALE[suffix]}"


def _is_quantizer_state(key: str) -> bool:
    return "_quantizer." in key or _FUSED_EXPERT_AMAX.fullmatch(key) is not None


def _planned(reader: CheckpointReader, keys: list[str], fmt: str, quantized: dict[str, _Amax]) -> Planned:
    """What :func:`_converted` writes, in its order, from shapes and the (small) amax alone."""
    for key in keys:
        if _is_quantizer_state(key):
            scale = _kv_scale(key)
            if scale is not None:
                yield scale, reader.shape(key), torch.float32
            elif not (key.endswith((WEIGHT_AMAX, INPUT_AMAX)) or _FUSED_EXPERT_AMAX.fullmatch(key)):
                raise BridgeError(f"{key}: quantizer state other than amax cannot be exported to {fmt}")
        elif key.endswith(".weight") and module_of(key) in quantized:
            module, weight, amax = module_of(key), tuple(reader.shape(key)), quantized[module_of(key)]
            for name, tensor in zip((amax.weight[0], amax.input), amax.read(reader), strict=True):
                _check_amax(name, tensor, weight)
            yield from _PLANS[fmt](module, weight, *amax.shapes(reader))
        else:
            yield key, reader.shape(key), reader.dtype(key)


def _converted(reader: CheckpointReader, keys: list[str], fmt: str, quantized: dict[str, _Amax]) -> Tensors:
    amax = resolved_amax(reader, fmt, quantized)
    for key in keys:
        if _is_quantizer_state(key):
            scale = _kv_scale(key)
            if scale is not None:
                yield scale, reader.read(key, ()).float() / numerics.E4M3_MAX
        elif key.endswith(".weight") and module_of(key) in quantized:
            yield from _QUANTIZERS[fmt](reader, module_of(key), *amax[module_of(key)])
        else:
            yield key, reader.read(key, ())


def unquantized_modules(
    reader: CheckpointReader, keys: list[str], quantized: Collection[str], config: dict
) -> set[str]:
    """The modules ModelOpt would list as unquantized: every other matmul, embedding or convolution
    (a ``.weight`` of two or more dims), and ``lm_head`` when it is tied to the embedding and so
    has no tensor of its own. Norms (1-dim weights) carry no quantizer and are not listed."""
    out = {module_of(k) for k in keys if k.endswith(".weight") and len(reader.shape(k)) >= 2} - set(quantized)
    text = config.get("text_config") or {}
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    if tied and "lm_head.weight" not in keys:
        out.add("lm_head")
    return out


def exclude_patterns(unquantized: set[str], quantized: Collection[str]) -> list[str]:
    """``exclude_modules`` as ModelOpt summarizes it: each unquantized module under the shortest
    dotted prefix wildcard (``model.visual*``, or ``a.*`` where ``a*`` would say too much) that
    matches no quantized module, or its own name."""
    taken = {q[:i] for q in quantized for i in range(len(q) + 1)}  # prefixes a wildcard must not cover
    out: set[str] = set()
    for module in sorted(unquantized):
        for i, char in enumerate(module):
            if char != ".":
                continue
            if module[:i] not in taken:
                choice = {module[:i] + "*"}
            elif module[: i + 1] not in taken and module[:i] not in quantized:
                choice = {module[:i] + ".*"}
            else:
                continue
            break
        else:
            choice = {module}
        out |= choice
    return sorted(out)


def quant_config(fmt: str, exclude: list[str], kv: bool) -> dict[str, Any]:
    """``hf_quant_config.json``: the algorithm, the KV cache format and the unquantized modules."""
    quantization: dict[str, Any] = {
        "quant_algo": _ALGO[fmt],
        "kv_cache_quant_algo": "FP8" if kv else None,
        "exclude_modules": exclude,
    }
    if fmt == "nvfp4":
        quantization["group_size"] = numerics.NVFP4_BLOCK
    return {"producer": PRODUCER, "quantization": quantization}


def config_quantization(hf_quant: dict[str, Any]) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` that newer ModelOpt writes next to it."""
    q = hf_quant["quantization"]
    bits = 4 if q["quant_algo"] == "NVFP4" else 8
    group = {"group_size": q["group_size"]} if "group_size" in q else {}
    tensor = {"dynamic": False, "num_bits": bits, "type": "float", **group}
    out: dict[str, Any] = {
        "quant_method": "modelopt",
        "quant_algo": q["quant_algo"],
        "ignore": q["exclude_modules"],
        "config_groups": {"group_0": {"weights": tensor, "input_activations": dict(tensor), "targets": ["Linear"]}},
        "producer": hf_quant["producer"],
    }
    if q["kv_cache_quant_algo"]:
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    return out


def export(
    fmt: str,
    src_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write the ``fmt`` checkpoint of the calibrated HF checkpoint ``src_dir`` to ``out_dir``."""
    if fmt not in _QUANTIZERS:
        raise BridgeError(f"--quant {fmt}: unknown format; this plugin writes {', '.join(sorted(_QUANTIZERS))}")
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    check_target(out_dir, overwrite)
    with CheckpointReader(src_dir) as reader:
        keys = reader.keys()
        blocks = next((k for k in keys if k.endswith(BLOCK_SCALE)), None)
        if blocks is not None:
            raise BridgeError(
                f"{src_dir}: holds FP8 block scales ({blocks}) of an FP8 release; --quant {fmt} starts from"
                " calibrated amax, --quant fp8-block writes the release's own format"
            )
        quantized = _quantized_modules(reader, keys)
        if not quantized:
            raise BridgeError(
                f"{src_dir}: no tensor ends in .{WEIGHT_AMAX}; export a calibrated model (with quantizer state) first"
            )
        config = json.loads((src_dir / "config.json").read_text())
        exclude = exclude_patterns(unquantized_modules(reader, keys, quantized, config), quantized)
        hf_quant = quant_config(fmt, exclude, any(k.endswith(KV_AMAX) for k in keys))
        config["quantization_config"] = config_quantization(hf_quant)
        _write(
            src_dir,
            out_dir,
            _planned(reader, keys, fmt, quantized),
            _converted(reader, keys, fmt, quantized),
            {"config.json": config, "hf_quant_config.json": hf_quant},
            overwrite,
            max_shard_size,
        )
    return out_dir


def _write(
    src_dir: Path,
    out_dir: Path,
    planned: Planned,
    tensors: Tensors,
    documents: dict[str, Any],
    overwrite: bool,
    max_shard_size: str | int,
) -> None:
    """``out_dir``, whole or not at all: ``tensors`` (laid out as ``planned``), ``src_dir``'s side files, and
    the JSON ``documents`` by file name over them."""
    writer = ShardedWriter(out_dir, list(planned), max_shard_size)
    temp_dir = writer.create()
    try:
        for name, tensor in tensors:
            writer.write(name, tensor)
        copy_side_files(src_dir, temp_dir)
        for file, document in documents.items():
            (temp_dir / file).write_text(json.dumps(document, indent=2) + "\n")
        writer.commit([writer.written()], overwrite=overwrite)
    except BaseException:
        writer.abort()
        raise


def export_fp8(
    src_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    return export("fp8", src_dir, out_dir, overwrite, max_shard_size)


def export_nvfp4(
    src_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    return export("nvfp4", src_dir, out_dir, overwrite, max_shard_size)


def export_fp8_block(
    src_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """The FP8 block-scaled checkpoint (an FP8 release's format) of ``src_dir``: the export of a model
    imported from such a release, which keeps its ``quantization_config`` and block scales
    (``<m>.weight_scale_inv``). Each ``<m>`` with kept scales is quantized again: blocks whose weights
    are unchanged keep their scales (so an unchanged import reproduces the release bit for bit), other
    blocks get ``amax / 448`` (:func:`numerics.fp8_block_quantize`); every other tensor is copied."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    check_target(out_dir, overwrite)
    config = json.loads((src_dir / "config.json").read_text())
    if "quantization_config" not in config:
        raise BridgeError(
            "--quant fp8-block writes the format of the FP8 release a model was imported from, and this model"
            " has none; import from the FP8 release (or export with --hf-config <the release>)"
        )
    method = config["quantization_config"].get("quant_method")
    if method != "fp8":
        raise BridgeError(
            f'--quant fp8-block writes FP8 block releases (quant_method "fp8"); this model was imported from a'
            f" {json.dumps(method)} checkpoint"
        )
    quantization = BlockFP8.parse(config["quantization_config"], f"{src_dir / 'config.json'}")
    with CheckpointReader(src_dir) as reader:
        keys = reader.keys()
        scales = {k.removesuffix(BLOCK_SCALE): k for k in keys if k.endswith(BLOCK_SCALE)}
        for module, scale in scales.items():
            weight = f"{module}.weight"
            if weight not in reader or quantization.scale_shape(tuple(reader.shape(weight))) != reader.shape(scale):
                raise BridgeError(f"{scale}: kept block scales without a weight {weight} of the matching shape")

        def planned() -> Planned:
            for key in keys:
                quantized = key.endswith(".weight") and module_of(key) in scales
                yield key, tuple(reader.shape(key)), torch.float8_e4m3fn if quantized else reader.dtype(key)

        def converted() -> Tensors:
            for key in keys:
                if key.endswith(BLOCK_SCALE):
                    continue  # written with its weight
                value = reader.read(key, ())
                if not (key.endswith(".weight") and module_of(key) in scales):
                    yield key, value
                    continue
                if not bool(value.isfinite().all()):
                    raise BridgeError(f"{key}: holds NaN or infinite values; FP8 blocks cannot represent them")
                kept = reader.read(scales[module_of(key)], ())
                codes, block_scales = numerics.fp8_block_quantize(value, kept, quantization.block, kept.dtype)
                yield key, codes
                yield scales[module_of(key)], block_scales

        _write(src_dir, out_dir, planned(), converted(), {}, overwrite, max_shard_size)
    return out_dir
