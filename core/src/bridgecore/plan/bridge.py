"""The bridge of one HF checkpoint: its plugin, Megatron config, mapping table and source record,
and the plan of each conversion; every executor (in memory, offline, weight streaming) starts here.

Import: every rank binds its own params to mappings and reads only the HF slices they need.
Export: the HF layout is planned up front from shapes alone (mappings run on meta tensors), one
rank creates the files, and every writer rank writes its own tensors, or its experts' slabs of a
stacked tensor, at their offsets; the output appears only when complete and verified.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bridgecore.casting import exact_cast
from bridgecore.errors import BridgeError
from bridgecore.hf.config import CONFIG_FILE, read_config, side_files
from bridgecore.hf.quantized import (
    QUANTIZATION_KEY,
    DequantizedReader,
    Quantization,
    detect,
    parse,
    without_quantization,
)
from bridgecore.hf.reader import CheckpointReader
from bridgecore.hf.values import CORE_KEYS, check_values
from bridgecore.mapping import Binding, HFPiece, MappingTable
from bridgecore.megatron import parallel, training
from bridgecore.megatron.build import build_chunks
from bridgecore.megatron.config import ModelConfig
from bridgecore.megatron.dcp import META, PASSTHROUGH, QUANTIZED, SIDE, read_meta
from bridgecore.megatron.params import LocalTensor, gathered, local_tensors, whole
from bridgecore.plan.checks import check_against_files, check_sizes
from bridgecore.plan.conversion import ConversionPlan
from bridgecore.plan.mtp import without_absent_mtp
from bridgecore.plan.source import SourceMeta
from bridgecore.plugins import PluginInfo, Plugins, installed
from bridgecore.version import __version__

Model = list[torch.nn.Module]


class Bridge:
    """The conversion of one HF checkpoint directory, driven by the plugin that claims it: what every
    executor needs to plan and bind a conversion, and no executor of its own."""

    def __init__(
        self,
        hf_dir: Path | None,
        hf_config: dict[str, Any],
        plugin: PluginInfo,
        plugins: Plugins,
        config: ModelConfig,
        reader: CheckpointReader | None,
        source: SourceMeta | None = None,
    ):
        self.hf_dir, self.hf_config, self.plugin, self.plugins = hf_dir, hf_config, plugin, plugins
        self.config, self.reader = config, reader
        self.source = source or (SourceMeta.of(reader) if reader else None)
        #: where passthrough tensors are read from on export: the HF checkpoint, or their copy
        #: beside a Megatron checkpoint.
        self.passthrough_reader = reader
        #: tensors and params ``--allow-unmapped`` left out at the last bind (rank 0), to report.
        self.waived: list[str] = []
        #: what the conversion decided on its own (e.g. leaving out MTP the checkpoint lacks), to say.
        self.notes: list[str] = []
        #: the dtype floating-point HF tensors are written in when no source checkpoint says theirs
        #: (an export from config.json alone); None keeps the params' dtype.
        self.float_dtype: torch.dtype | None = None
        #: the tensor keys of the Megatron checkpoint this bridge exports from, when it does.
        self.megatron_keys: frozenset[str] | None = None
        #: the plan this conversion executes (see :meth:`plan_conversion`).
        self.conversion: ConversionPlan | None = None
        #: the source's quantization when its weights are read dequantized (FP8; ``hf_config``
        #: is then the dequantized model's config), and where its block scales are read from: the HF
        #: checkpoint, or their copy beside a Megatron checkpoint (``quantized/``).
        self.quantization: Quantization | None = None
        self.scales: CheckpointReader | None = None
        #: whether an HF export also writes the kept block scales and ``quantization_config``: the
        #: input of ``export --quant fp8-block``.
        self.export_scales = False

    @classmethod
    def from_hf_pretrained(
        cls,
        path: str | Path,
        *,
        plugin: str | None = None,
        plugins: Plugins | None = None,
        params_dtype: torch.dtype | None = None,
        weights: bool = True,
    ) -> Bridge:
        """Read ``config.json`` (plain JSON, never remote code) and, lazily, the safetensors files."""
        hf_dir = Path(path)
        hf_config = read_config(hf_dir)
        side_files(hf_dir)  # refused now, not at the end of the conversion that would copy them
        reader, quantization = _open(hf_dir, hf_config) if weights else (None, None)
        bridge = cls.from_hf_config(
            without_quantization(hf_config) if quantization else hf_config,
            hf_dir=hf_dir,
            plugin=plugin,
            plugins=plugins,
            params_dtype=params_dtype,
            reader=reader,
        )
        bridge._quantized_by(quantization, reader)
        return bridge

    @classmethod
    def from_hf_config(
        cls,
        hf_config: dict[str, Any],
        *,
        hf_dir: Path | None = None,
        plugin: str | None = None,
        plugins: Plugins | None = None,
        params_dtype: torch.dtype | None = None,
        reader: CheckpointReader | None = None,
        source: SourceMeta | None = None,
    ) -> Bridge:
        plugins = plugins or installed()
        where = str(hf_dir / "config.json") if hf_dir else "config"
        owner = plugins.choose(hf_config, plugin, where=where)
        family = plugins.call_owned("config_values", owner) if "config_values" in owner.hooks else None
        check_values(hf_config, {**CORE_KEYS, **(family or {})}, where)
        config = plugins.call_owned("provider_config", owner, hf_config=hf_config)
        if config is None:
            raise BridgeError(f"{where}: plugin {owner.name} declined this config")
        check_sizes(config, f"{where} (via plugin {owner.name})")
        if source is not None or reader is not None:
            shapes = (
                {n: s for n, (s, _) in source.tensors.items()}
                if source
                else {k: reader.shape(k) for k in reader.keys()}
            )
            check_against_files(config, shapes, f"{where} (via plugin {owner.name})")
        config.hf_config = hf_config
        if params_dtype is not None:
            config = dataclasses.replace(
                config,
                params_dtype=params_dtype,
                bf16=params_dtype == torch.bfloat16,
                fp16=params_dtype == torch.float16,
            )
        bridge = cls(hf_dir, hf_config, owner, plugins, config, reader, source)
        bridge._leave_out_absent_mtp()
        return bridge

    @classmethod
    def from_megatron_checkpoint(
        cls, ckpt_dir: str | Path, *, plugin: str | None = None, plugins: Plugins | None = None
    ) -> Bridge:
        """The bridge of a checkpoint ``bridgecore import`` wrote (its record says the rest)."""

        ckpt_dir = Path(ckpt_dir)
        meta = read_meta(ckpt_dir)
        bridge = cls.from_hf_config(
            meta["hf_config"],
            plugin=plugin or meta.get("plugin"),
            plugins=plugins,
            params_dtype=getattr(torch, meta["params_dtype"]),
            source=SourceMeta.from_json(meta["source"], meta.get("source_index_metadata")),
        )
        bridge.megatron_keys = frozenset(training.saved_metadata(training.torch_dist_dir(ckpt_dir)).state_dict_metadata)
        side = ckpt_dir / SIDE
        bridge.hf_dir = side if side.is_dir() else None
        if (ckpt_dir / PASSTHROUGH).is_dir():
            bridge.passthrough_reader = CheckpointReader(ckpt_dir / PASSTHROUGH)
        if meta.get("quantization") is not None:
            quantization = parse(meta["quantization"], str(ckpt_dir / META))
            kept = ckpt_dir / QUANTIZED  # none where the quantization keeps its scales as amax
            bridge._quantized_by(quantization, CheckpointReader(kept) if kept.is_dir() else None)
        return bridge

    @classmethod
    def from_training_run(
        cls, hf_config: str | Path, ckpt_dir: str | Path, iteration: int | None = None, plugin: str | None = None
    ) -> Bridge:
        """The bridge that exports a checkpoint bridgecore did not write, from the model's HF config.

        ``hf_config`` is a directory holding ``config.json`` (typically the HF checkpoint the training
        started from: its safetensors headers then give the exact names, layout and dtypes to write) or
        that ``config.json`` itself. The params are built in the dtype the checkpoint saved them in, and
        the checkpoint's ``args`` are checked against the config here, before any model is built.
        """
        path = Path(hf_config)
        if path.is_file() and path.name == CONFIG_FILE:
            path = path.parent
        elif not path.is_dir():
            raise BridgeError(f"--hf-config {path}: expected a directory holding {CONFIG_FILE}, or that file")
        config = read_config(path)
        reader, quantization = _open(path, config) if any(path.glob("*.safetensors")) else (None, None)
        if quantization:
            config = without_quantization(config)
        torch_dist = training.torch_dist_dir(ckpt_dir, iteration)
        metadata = training.saved_metadata(torch_dist)
        params_dtype = training.saved_float_dtype(metadata)
        if params_dtype is None:
            raise BridgeError(f"{torch_dist}: holds no model weights (only optimizer or RNG state)")
        bridge = cls.from_hf_config(
            config,
            hf_dir=path,
            plugin=plugin,
            params_dtype=params_dtype,
            reader=reader,
            source=SourceMeta.of(reader) if reader else None,
        )
        bridge.megatron_keys = frozenset(metadata.state_dict_metadata)
        bridge._quantized_by(quantization, reader)
        if reader is None:
            bridge.float_dtype = training.config_dtype(config, path / CONFIG_FILE)
        args = training.saved_args(torch_dist)
        if args is not None:
            training.check_args(bridge.config, *args)
        return bridge

    def _quantized_by(self, quantization: Quantization | None, scales: CheckpointReader | None) -> None:
        self.quantization, self.scales = quantization, scales if quantization else None

    def quantized_weights(self) -> list[str]:
        """The weights a quantized HF source stores quantized (read dequantized)."""
        return self.reader.weights() if isinstance(self.reader, DequantizedReader) else []

    def scale_names(self) -> list[str]:
        """The kept block scales of a quantized source, in its order."""
        if self.scales is None:
            return []
        return self.scales.scales() if isinstance(self.scales, DequantizedReader) else self.scales.keys()

    def export_config(self) -> dict[str, Any] | None:
        """The config.json an HF export writes, or None to copy the source's with the side files: the
        dequantized model's config for a quantized source, with its ``quantization_config`` back when
        the export keeps the scales."""
        if self.export_scales and self.quantization:
            return {**self.hf_config, QUANTIZATION_KEY: self.quantization.config}
        return self.hf_config if self.quantization or self.hf_dir is None else None

    def _leave_out_absent_mtp(self) -> None:
        """Build without the MTP layers config.json declares when the checkpoint holds none of them."""
        if not self.config.mtp_num_layers or not self.hf_keys:
            return
        mappings = self.plugins.call_owned("mappings", self.plugin, config=self.config, hf_keys=self.hf_keys)
        self.config, note = without_absent_mtp(self.config, mappings or [], self.hf_keys)
        if note:
            self.notes.append(note)

    # -- configuration and tables -------------------------------------------------------------
    def to_megatron_config(self) -> ModelConfig:
        return self.config

    @property
    def hf_keys(self) -> frozenset[str]:
        return frozenset(self.source.tensors) if self.source else frozenset()

    @property
    def passthrough(self) -> list[str]:
        """HF tensors the plugin keeps verbatim (see the ``passthrough`` hook), in source order."""
        if not self.source or "passthrough" not in self.plugin.hooks:
            return []
        globs = self.plugins.call_owned("passthrough", self.plugin, config=self.config, hf_keys=self.hf_keys) or []
        return [k for k in self.source.tensors if any(fnmatch.fnmatchcase(k, g) for g in globs)]

    def mapping_table(self) -> MappingTable:
        weights = self.plugins.call_owned("mappings", self.plugin, config=self.config, hf_keys=self.hf_keys)
        if not weights:
            raise BridgeError(f"plugin {self.plugin.name} returned no mappings for this checkpoint")
        extra = [
            m
            for ms in self.plugins.call_all(
                "quant_mappings", config=self.config, mappings=weights, hf_keys=self.hf_keys
            )
            for m in ms or ()
        ]
        return MappingTable(list(weights) + extra)

    def plan_conversion(
        self, layout: parallel.Layout | None = None, allow_unmapped: Sequence[str] = ()
    ) -> ConversionPlan:
        """Check ``layout`` against the model, then decide once what the conversion reads, maps,
        keeps verbatim and checks; every path (in memory, offline, under torchrun) executes it."""
        layout = layout or parallel.Layout()
        parallel.check_divisible(self.config, layout)
        self.conversion = ConversionPlan(self, layout, self.mapping_table(), self.passthrough, tuple(allow_unmapped))
        return self.conversion

    def conversion_for(self, layout: parallel.Layout | None = None) -> ConversionPlan:
        """The plan made last, or one for ``layout`` (keeping its waivers) when that differs or none was made."""
        made = self.conversion
        if made is None or (layout is not None and made.layout != layout):
            return self.plan_conversion(layout, made.allow_unmapped if made else ())
        return made

    # -- Megatron model, as the plan builds and binds it -------------------------------------------
    def build_chunks(self, layout: parallel.Layout, meta: bool = False) -> Model:
        """This rank's model chunks for ``layout`` in megatron-core's current parallel state, unloaded."""
        plan = self.conversion_for(layout)
        self.config = dataclasses.replace(
            self.config,
            **layout.megatron_sizes(),
            pipeline_dtype=self.config.params_dtype,
        )
        spec = lambda vp_stage: self.plugins.call_owned(
            "layer_spec", self.plugin, config=self.config, vp_stage=vp_stage
        )  # noqa: E731
        model = build_chunks(self.config, spec, meta)
        plan.prepare(model)
        return model

    def bind(
        self, model: Model, hf_keys: frozenset[str] | None, allow_unmapped: Sequence[str] = ()
    ) -> list[tuple[LocalTensor, Binding]]:
        """This rank's tensors with their mappings; coverage is checked over all ranks together."""
        plan = self.conversion_for()
        table = plan.table
        tensors = [t for t in local_tensors(model, self.config) if not self.embedding_copy(t)]

        def cover() -> None:
            names = sorted({n for names in parallel.all_gather_objects([t.name for t in tensors]) for n in names})
            if parallel.rank() == 0:
                plan.cover(names, hf_keys, allow_unmapped)
                self.waived = plan.waived

        parallel.collective(cover)
        bound = []
        for t in tensors:
            binding = table.find(t.name)
            if binding is None:
                continue  # waived by allow_unmapped, reported by cover()
            if t.partition_dim is not None and binding.mapping.partition_dim != t.partition_dim:
                raise BridgeError(
                    f"{t.name}: Megatron splits it along dim {t.partition_dim} but {binding.mapping!r}"
                    f" splits along {binding.mapping.partition_dim}"
                )
            bound.append((t, binding))
        return bound

    def embedding_copy(self, t: LocalTensor) -> bool:
        """Whether ``t`` copies the first stage's embedding, so nothing maps it and nobody writes it.

        With tied embeddings the last stage keeps one as ``output_layer.weight``; with MTP on a
        later pipeline stage, that stage keeps one as ``embedding.word_embeddings.weight``.
        """
        from megatron.core import parallel_state as ps

        if self.config.share_embeddings_and_output_weights and t.name.endswith("output_layer.weight"):
            return True
        embedding = t.name == "embedding.word_embeddings.weight" or t.name.endswith(".embedding.word_embeddings.weight")
        return embedding and not ps.is_pipeline_first_stage(ignore_virtual=True)

    def megatron_meta(self) -> dict[str, Any]:
        """What a Megatron checkpoint keeps beside its weights so that export needs nothing else."""
        return {
            "bridgecore": __version__,
            "plugin": self.plugin.name,
            "params_dtype": str(self.config.params_dtype).removeprefix("torch."),
            "hf_config": self.hf_config,
            "source": self.source.to_json() if self.source else [],
            "source_index_metadata": self.source.index_metadata if self.source else None,
            **({"quantization": self.quantization.config} if self.quantization else {}),
        }

    # -- export plan --------------------------------------------------------------------------------
    def pieces(self, t: LocalTensor, b: Binding, named: dict[str, LocalTensor], meta: bool = False) -> list[HFPiece]:
        """``t``'s HF pieces, its shards gathered over TP; ``named`` holds this rank's bound tensors by
        name, for what the mapping needs."""
        needs = b.mapping.needs(b.capture_dict)
        given = [None if n not in named else whole(named[n], meta) for n in needs] if needs else None
        return self.hf_pieces(b, gathered(t, meta), given, t.tensor.dtype)

    def hf_pieces(
        self, b: Binding, shards: list[torch.Tensor], given: list[torch.Tensor | None] | None, dtype: torch.dtype
    ) -> list[HFPiece]:
        """The HF pieces of a param of ``dtype`` from its TP ``shards`` and, when its mapping needs other
        params, their whole values ``given``; each cast exactly to the dtype it is written in."""
        pieces = b.mapping.to_hf(shards, b.capture_dict, *(() if given is None else (given,)))
        for piece in pieces:
            piece.tensor = exact_cast(piece.tensor.detach(), self.hf_dtype(piece.name, dtype), piece.name)
        return pieces

    def hf_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype HF tensor ``name``, made from a param of ``dtype``, is written in."""
        if self.source and name in self.hf_keys:
            return self.source.dtype(name)
        return self.float_dtype if self.float_dtype and dtype.is_floating_point else dtype

    def export_entries(
        self, bound: list[tuple[LocalTensor, Binding]]
    ) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """Every HF tensor the export writes, in the source checkpoint's order when there is one."""
        mine = {}
        named = {t.name: t for t, _ in bound}
        for t, b in bound:
            if t.writer:
                for p in self.pieces(t, b, named, meta=True):
                    mine[p.name] = (p.full_shape, p.tensor.dtype)
        merged: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for part in parallel.all_gather_objects(mine):
            for name, entry in part.items():
                if merged.setdefault(name, entry) != entry:
                    raise BridgeError(f"{name}: ranks disagree on its shape/dtype: {merged[name]} vs {entry}")
        for name in self.conversion_for().passthrough:
            merged[name] = (self.source.shape(name), self.source.dtype(name))
        for name in self.scale_names() if self.export_scales else []:
            merged[name] = (self.scales.shape(name), self.scales.dtype(name))
        order = [k for k in (self.source.tensors if self.source else []) if k in merged]
        order += sorted(set(merged) - set(order))
        return [(name, *merged[name]) for name in order]


def _open(hf_dir: Path, hf_config: dict[str, Any]) -> tuple[CheckpointReader, Quantization | None]:
    """The reader of ``hf_dir``'s weights, dequantizing when ``config.json`` declares a quantization
    bridgecore reads (any other is refused with one line), and that quantization. Only headers are read."""
    reader = CheckpointReader(hf_dir)
    where = hf_dir / CONFIG_FILE
    quantization = detect(hf_config, hf_dir, {k: reader.dtype(k) for k in reader.keys()}, str(where))
    if quantization is None:
        return reader, None
    dtype = training.config_dtype(hf_config, where, "; expected the dtype its FP8 weights dequantize to")
    return DequantizedReader(hf_dir, quantization, dtype), quantization
