"""AutoBridge: one HF checkpoint, its plugin, and the Megatron model it converts to and from.

Import: every rank binds its own params to mappings and reads only the HF slices they need.
Export: the HF layout is planned up front from shapes alone (mappings run on meta tensors), one
rank creates the files, and every writer rank writes its own tensors, or its experts' slabs of a
stacked tensor, at their offsets; the output appears only when complete and verified.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bridgecore import __version__
from bridgecore.conversion import ConversionPlan
from bridgecore.errors import BridgeError
from bridgecore.hf.config import read_config, side_files
from bridgecore.hf.reader import INDEX_FILE, CheckpointReader
from bridgecore.hf.values import CORE_KEYS, check_values
from bridgecore.hf.writer import ShardedWriter, check_target, parse_size
from bridgecore.mapping import Binding, Copies, HFPiece, MappingTable
from bridgecore.megatron import parallel
from bridgecore.megatron.build import build_chunks
from bridgecore.megatron.config import ModelConfig
from bridgecore.megatron.params import LocalTensor, local_tensors
from bridgecore.plugins import PluginInfo, Plugins, installed
from bridgecore.progress import track
from bridgecore.weights import WeightBucket, buckets

Model = list[torch.nn.Module]


@dataclass
class SourceMeta:
    """Names, shapes, dtypes and files of the source HF checkpoint, in its order: what export restores.

    Export casts every tensor back to its source dtype and writes tensors in source order into the
    source's files, also when it starts from a Megatron checkpoint, which keeps this record beside
    its weights (records written before files were kept have none: export then shards by size).
    """

    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]
    #: the file of each tensor, when known, in the order of the source's index (its file order
    #: without an index); ``tensors`` keeps the order of the data in the files.
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    #: the ``metadata`` object of the source's index (``total_size``, and ``total_parameters`` as
    #: transformers writes it), restored with its files; None without an index.
    index_metadata: dict[str, Any] | None = None

    @classmethod
    def of(cls, reader: CheckpointReader) -> SourceMeta:
        index = reader.hf_dir / INDEX_FILE
        # The reader has validated the index: it names exactly the tensors of the files.
        document = json.loads(index.read_text(encoding="utf-8")) if index.is_file() else None
        metadata = document.get("metadata") if document else None
        return cls(
            {k: (tuple(reader.shape(k)), reader.dtype(k)) for k in reader.keys()},
            {k: reader.file_of(k).name for k in (document["weight_map"] if document else reader.keys())},
            metadata if isinstance(metadata, dict) else None,
        )

    def files_of(self, names: Sequence[str]) -> dict[str, str] | None:
        """The source file of each of ``names``, in index order, or None unless ``names`` are
        exactly the tensors the source's files hold."""
        if not names or set(names) != self.files.keys():
            return None
        return dict(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name][1]

    def to_json(self) -> list[list[Any]]:
        """One row per tensor in data order: name, shape, dtype and, when known, file and index position."""
        position = {n: i for i, n in enumerate(self.files)}
        return [
            [n, list(s), str(d).removeprefix("torch."), *([self.files[n], position[n]] if n in self.files else [])]
            for n, (s, d) in self.tensors.items()
        ]

    @classmethod
    def from_json(cls, rows: list[list[Any]], index_metadata: dict[str, Any] | None = None) -> SourceMeta:
        """Rows of :meth:`to_json`; rows of records written before files were kept have three entries."""
        placed = sorted((row for row in rows if len(row) == 5), key=lambda row: row[4])
        return cls(
            {n: (tuple(s), getattr(torch, d)) for n, s, d, *_ in rows},
            {row[0]: row[3] for row in placed},
            index_metadata,
        )


#: model sizes every conversion builds tensors from; larger values are corrupt configs, not models.
_SIZES = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "ffn_hidden_size",
    "vocab_size",
)
#: sizes only mixture-of-experts models have: absent (None) for dense ones.
_MOE_SIZES = ("num_moe_experts", "moe_ffn_hidden_size")
_MAX_SIZE = 2**31


def _check_sizes(config: ModelConfig, where: str) -> None:
    """Refuse sizes no model has before megatron-core allocates (or overflows) with them."""
    for name in _SIZES + _MOE_SIZES:
        value = getattr(config, name, None)
        if value is None and name in _MOE_SIZES:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < _MAX_SIZE:
            raise BridgeError(f"{where}: {name} is {value!r}; expected a positive integer below 2**31")


#: how many times more elements the model may hold than the checkpoint's files declare (packed
#: quantized tensors hold several values per element, vocabularies are padded).
_ELEMENT_SLACK = 4


def _check_against_files(config: ModelConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Refuse sizes the checkpoint's safetensors headers cannot back, before anything is allocated:
    a layer needs at least one tensor, no size exceeds the largest tensor, and the embedding and one
    norm per layer fit in the elements the files declare."""
    if not shapes:
        return
    numels = [math.prod(shape) for shape in shapes.values()]
    largest, total = max(numels), sum(numels)
    if config.num_layers > len(shapes):
        raise BridgeError(
            f"{where}: num_layers is {config.num_layers}, but the checkpoint holds only {len(shapes)} tensors;"
            " expected at least one tensor per layer"
        )
    for name in _SIZES[1:] + _MOE_SIZES:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > largest:
            raise BridgeError(
                f"{where}: {name} is {value}, larger than the checkpoint's largest tensor ({largest} elements)"
            )
    least = config.vocab_size * config.hidden_size + config.num_layers * config.hidden_size
    if least > _ELEMENT_SLACK * total:
        raise BridgeError(
            f"{where}: vocab_size {config.vocab_size}, hidden_size {config.hidden_size} and num_layers"
            f" {config.num_layers} need at least {least} parameters, but the safetensors headers declare"
            f" {total} elements; expected a config that matches the weights"
        )


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


def _can_take(param: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether ``param`` (a tensor of its own, not a view) can take ``value`` as its data unchanged."""
    return (
        param._base is None
        and value.is_contiguous()
        and value.dtype == param.dtype
        and value.device == param.device
        and tuple(value.shape) == tuple(param.shape)
    )


class AutoBridge:
    """The conversion of one HF checkpoint directory, driven by the plugin that claims it."""

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

    @classmethod
    def from_hf_pretrained(
        cls,
        path: str | Path,
        *,
        plugin: str | None = None,
        plugins: Plugins | None = None,
        params_dtype: torch.dtype | None = None,
        weights: bool = True,
    ) -> AutoBridge:
        """Read ``config.json`` (plain JSON, never remote code) and, lazily, the safetensors files."""
        hf_dir = Path(path)
        hf_config = read_config(hf_dir)
        side_files(hf_dir)  # refused now, not at the end of the conversion that would copy them
        return cls.from_hf_config(
            hf_config,
            hf_dir=hf_dir,
            plugin=plugin,
            plugins=plugins,
            params_dtype=params_dtype,
            reader=CheckpointReader(hf_dir) if weights else None,
        )

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
    ) -> AutoBridge:
        plugins = plugins or installed()
        where = str(hf_dir / "config.json") if hf_dir else "config"
        owner = plugins.choose(hf_config, plugin, where=where)
        family = plugins.call_owned("config_values", owner) if "config_values" in owner.hooks else None
        check_values(hf_config, {**CORE_KEYS, **(family or {})}, where)
        config = plugins.call_owned("provider_config", owner, hf_config=hf_config)
        if config is None:
            raise BridgeError(f"{where}: plugin {owner.name} declined this config")
        _check_sizes(config, f"{where} (via plugin {owner.name})")
        if source is not None or reader is not None:
            shapes = (
                {n: s for n, (s, _) in source.tensors.items()}
                if source
                else {k: reader.shape(k) for k in reader.keys()}
            )
            _check_against_files(config, shapes, f"{where} (via plugin {owner.name})")
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
    ) -> AutoBridge:
        """The bridge of a checkpoint written by :meth:`save_megatron` (``bridgecore import``)."""
        from bridgecore.megatron.checkpoint import PASSTHROUGH, SIDE, read_meta
        from bridgecore.megatron.training import saved_metadata, torch_dist_dir

        ckpt_dir = Path(ckpt_dir)
        meta = read_meta(ckpt_dir)
        bridge = cls.from_hf_config(
            meta["hf_config"],
            plugin=plugin or meta.get("plugin"),
            plugins=plugins,
            params_dtype=getattr(torch, meta["params_dtype"]),
            source=SourceMeta.from_json(meta["source"], meta.get("source_index_metadata")),
        )
        bridge.megatron_keys = frozenset(saved_metadata(torch_dist_dir(ckpt_dir)).state_dict_metadata)
        side = ckpt_dir / SIDE
        bridge.hf_dir = side if side.is_dir() else None
        if (ckpt_dir / PASSTHROUGH).is_dir():
            bridge.passthrough_reader = CheckpointReader(ckpt_dir / PASSTHROUGH)
        return bridge

    def _leave_out_absent_mtp(self) -> None:
        """Build without the MTP layers config.json declares when the checkpoint holds none of them."""
        from bridgecore.mtp import without_absent_mtp

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

    def _conversion(self, layout: parallel.Layout | None = None) -> ConversionPlan:
        """The plan made last, or one for ``layout`` (keeping its waivers) when that differs or none was made."""
        made = self.conversion
        if made is None or (layout is not None and made.layout != layout):
            return self.plan_conversion(layout, made.allow_unmapped if made else ())
        return made

    # -- Megatron model -------------------------------------------------------------------------
    def to_megatron_model(
        self,
        layout: parallel.Layout | None = None,
        load_weights: bool = True,
        allow_unmapped: Sequence[str] = (),
        meta: bool = False,
    ) -> Model:
        """Build this rank's model chunks for ``layout`` and (by default) load the HF weights.

        ``meta=True`` builds without memory (shapes only) and never loads.
        """
        layout = layout or parallel.Layout()
        self.plan_conversion(layout, allow_unmapped)
        parallel.init_model_parallel(layout)
        model = parallel.collective(self.build_chunks, layout, meta)
        if load_weights and not meta:
            self.load_hf_weights(model, allow_unmapped=allow_unmapped)
        return model

    def build_chunks(self, layout: parallel.Layout, meta: bool = False) -> Model:
        """This rank's model chunks for ``layout`` in megatron-core's current parallel state, unloaded."""
        plan = self._conversion(layout)
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
        plan = self._conversion()
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

    def load_hf_weights(self, model: Model, allow_unmapped: Sequence[str] = (), share_source: bool = False) -> None:
        """Copy the HF weights into ``model``, every tensor read only for the slices this rank holds.

        With ``share_source`` a param whose value comes out whole, contiguous and in its dtype takes
        that value as its data instead of a copy: the bytes the reader read for it, or the new tensor
        the mapping made. That saves a copy of every such param and the model's own allocation; such
        a param may be a view of a larger read (a slice along an inner dim), so only a caller that
        saves the model and drops it (``bridgecore import``) asks."""
        if self.reader is None:
            raise BridgeError("this bridge was made without weights (from a config only)")
        bound = parallel.collective(self.bind, model, self.hf_keys, allow_unmapped)

        def load() -> None:
            for t, b in track(bound, "import", "tensor", enabled=parallel.rank() == 0):
                sources = ", ".join(b.hf)
                try:
                    value = b.mapping.to_megatron(self.reader, b.capture_dict, t.shard)
                except BridgeError as err:
                    # Mapping errors name the pattern; the user needs the concrete tensors.
                    raise BridgeError(f"{t.name} <- {sources}: {err}") from None
                if tuple(value.shape) != tuple(t.tensor.shape):
                    raise BridgeError(
                        f"{t.name}: {b.mapping!r} made shape {list(value.shape)} from {sources},"
                        f" but the Megatron tensor has {list(t.tensor.shape)}"
                    )
                if value.is_floating_point() != t.tensor.is_floating_point():
                    # An integer tensor can cast exactly to a float param, yet it is never a weight.
                    raise BridgeError(
                        f"{sources}: dtype {value.dtype} in the checkpoint, expected a"
                        f" {'floating-point' if t.tensor.is_floating_point() else 'integer'} tensor for {t.name}"
                        f" ({t.tensor.dtype})"
                    )
                value = exact_cast(value, t.tensor.dtype, f"{t.name} <- {sources}")
                if share_source and _can_take(t.tensor, value):
                    t.tensor.data = value
                    continue
                with torch.no_grad():
                    t.tensor.copy_(value)

        parallel.collective(load)

    # -- Megatron checkpoints -----------------------------------------------------------------
    def save_megatron(self, model: Model, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Save ``model`` as a torch_dist checkpoint Megatron-LM can ``--load`` (all ranks call)."""
        from bridgecore.megatron.checkpoint import save_dist

        plan = self._conversion()
        save_dist(model, Path(out_dir), self.megatron_meta(), self.hf_dir, overwrite, extra=plan.keep_passthrough)
        return Path(out_dir)

    def megatron_meta(self) -> dict[str, Any]:
        """What a Megatron checkpoint keeps beside its weights so that export needs nothing else."""
        return {
            "bridgecore": __version__,
            "plugin": self.plugin.name,
            "params_dtype": str(self.config.params_dtype).removeprefix("torch."),
            "hf_config": self.hf_config,
            "source": self.source.to_json() if self.source else [],
            "source_index_metadata": self.source.index_metadata if self.source else None,
        }

    def load_megatron(self, model: Model, ckpt_dir: str | Path, iteration: int | None = None) -> None:
        """Load a Megatron checkpoint's model weights: ``bridgecore import`` output, or a Megatron-LM /
        Megatron-Bridge training run's (``iteration``, default the tracker's; optimizer and RNG
        state are never read). Its sizes and keys are checked against this bridge's config first."""
        from bridgecore.megatron.checkpoint import load_dist
        from bridgecore.megatron.training import torch_dist_dir

        load_dist(model, parallel.collective(torch_dist_dir, ckpt_dir, iteration), self.config)

    # -- export ---------------------------------------------------------------------------------
    def _pieces(self, t: LocalTensor, b: Binding, named: dict[str, LocalTensor], meta: bool = False) -> list[HFPiece]:
        """``t``'s HF pieces; ``named`` holds this rank's bound tensors by name, for what the mapping needs."""
        needs = b.mapping.needs(b.capture_dict)
        if needs:
            given = [None if n not in named else _whole(named[n], meta) for n in needs]
            pieces = b.mapping.to_hf(_shards(t, meta), b.capture_dict, given)
        else:
            pieces = b.mapping.to_hf(_shards(t, meta), b.capture_dict)
        for piece in pieces:
            dtype = self.hf_dtype(piece.name, t.tensor.dtype)
            piece.tensor = exact_cast(piece.tensor.detach(), dtype, piece.name)
        return pieces

    def hf_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype HF tensor ``name``, made from a param of ``dtype``, is written in."""
        if self.source and name in self.hf_keys:
            return self.source.dtype(name)
        return self.float_dtype if self.float_dtype and dtype.is_floating_point else dtype

    def plan(self, bound: list[tuple[LocalTensor, Binding]]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """Every HF tensor the export writes, in the source checkpoint's order when there is one."""
        mine = {}
        named = {t.name: t for t, _ in bound}
        for t, b in bound:
            if t.writer:
                for p in self._pieces(t, b, named, meta=True):
                    mine[p.name] = (p.full_shape, p.tensor.dtype)
        merged: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for part in parallel.all_gather_objects(mine):
            for name, entry in part.items():
                if merged.setdefault(name, entry) != entry:
                    raise BridgeError(f"{name}: ranks disagree on its shape/dtype: {merged[name]} vs {entry}")
        for name in self._conversion().passthrough:
            merged[name] = (self.source.shape(name), self.source.dtype(name))
        order = [k for k in (self.source.tensors if self.source else []) if k in merged]
        order += sorted(set(merged) - set(order))
        return [(name, *merged[name]) for name in order]

    def export_hf_weights(
        self,
        model: Model,
        *,
        bucket_size: int | str | None = None,
        device: torch.device | str | None = None,
        buffer: torch.Tensor | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]] | Iterator[WeightBucket]:
        """HF (name, tensor) pairs, on every rank, gathered over TP and EP; stacked experts whole.

        With ``bucket_size`` (bytes, or a string such as ``"2GB"``) it yields
        :class:`bridgecore.weights.WeightBucket` s instead: the same tensors in the same order, packed
        into one flat buffer per bucket of at most that size (:func:`bridgecore.weights.buckets`;
        a ``buffer`` kept by the caller is packed with every bucket instead of new memory). ``device``
        is where the yielded tensors or new buffers live: ``"cpu"`` stages them in host memory; by
        default they stay on the model's device.
        For big models prefer :meth:`save_hf_pretrained`, which never gathers beyond TP.
        """
        pairs = self._hf_weight_pairs(model)
        if bucket_size is not None:
            return buckets(pairs, parse_size(bucket_size), device, buffer)
        if device is not None:
            return ((name, tensor.to(device)) for name, tensor in pairs)
        return pairs

    def _hf_weight_pairs(self, model: Model) -> Iterator[tuple[str, torch.Tensor]]:
        bound = parallel.collective(self.bind, model, None)
        pending: dict[str, torch.Tensor] = {}
        filled: dict[str, int] = {}
        copies = Copies()
        for part in _gathered_pieces(self, bound):
            for piece in part:
                if not copies.keep(piece):
                    continue
                if piece.expert is None:
                    yield piece.name, piece.tensor
                    continue
                stack = pending.setdefault(piece.name, torch.empty(piece.full_shape, dtype=piece.tensor.dtype))
                stack[piece.expert] = piece.tensor
                filled[piece.name] = filled.get(piece.name, 0) + 1
                if filled[piece.name] == piece.num_experts:
                    yield piece.name, pending.pop(piece.name)
        Copies.check([copies.digests])
        if parallel.rank() == 0:
            for line in Copies.said([copies.notes]):
                print(f"note: {line}", flush=True)
        for name in self._conversion().passthrough:
            yield name, self.passthrough_reader.read(name, ())

    def save_hf_pretrained(
        self, model: Model, out_dir: str | Path, *, max_shard_size: int | str | None = None, overwrite: bool = False
    ) -> Path:
        """Write the HF checkpoint, all writer ranks in parallel; ``out_dir`` appears when complete.

        Without ``max_shard_size`` the source checkpoint's own files are restored where it is known,
        else shards of 5 GB; with it, shards of at most that size."""
        out_dir = Path(out_dir)
        parallel.collective(check_target, out_dir, overwrite)
        bound = parallel.collective(self.bind, model, None)
        plan = parallel.collective(self.plan, bound)
        conversion = self._conversion()

        named = {t.name: t for t, _ in bound}

        def write(writer: ShardedWriter, copies: Copies) -> None:
            for t, b in track(bound, "export", "tensor", enabled=parallel.rank() == 0):
                pieces = self._pieces(t, b, named)
                if t.writer:
                    for p in pieces:
                        if copies.keep(p):
                            writer.write(p.name, p.tensor, expert=p.expert)

        size = None if max_shard_size is None else parse_size(max_shard_size)
        conversion.write_hf(out_dir, plan, size, write, overwrite)
        return out_dir


def _gathered_pieces(bridge: AutoBridge, bound: list[tuple[LocalTensor, Binding]]) -> Iterator[list[HFPiece]]:
    """Each tensor's HF pieces as every rank sees them: gathered over TP, then shared over EP and PP."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise BridgeError("export_hf_weights gathers over TP and EP only; with PP>1 use save_hf_pretrained")
    named = {t.name: t for t, _ in bound}
    for t, b in bound:
        pieces = bridge._pieces(t, b, named)
        if not t.writer:
            pieces = []
        if t.expert and ps.get_expert_model_parallel_world_size() > 1:
            pieces = [
                p for part in parallel.all_gather_objects(pieces, ps.get_expert_model_parallel_group()) for p in part
            ]
        yield pieces


def _shards(t: LocalTensor, meta: bool) -> list[torch.Tensor]:
    """``t`` as every rank of its TP group holds it, in rank order (gathered; empty ones when ``meta``)."""
    if meta:
        return [torch.empty(t.tensor.shape, dtype=t.tensor.dtype, device="meta")] * t.shard.size
    if t.shard.size == 1:
        return [t.tensor]
    shards = [torch.empty_like(t.tensor) for _ in range(t.shard.size)]
    dist.all_gather(shards, t.tensor.contiguous(), group=t.group)
    return shards


def _whole(t: LocalTensor, meta: bool) -> torch.Tensor:
    """``t`` whole: its TP shards joined along the dim they split."""
    shards = _shards(t, meta)
    return shards[0] if len(shards) == 1 else torch.cat(shards, dim=t.partition_dim)
