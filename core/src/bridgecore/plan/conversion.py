"""One conversion, decided once: what it reads, maps, keeps verbatim, checks and writes.

:meth:`bridgecore.plan.bridge.Bridge.plan_conversion` makes the :class:`ConversionPlan` of a layout.
The executors (in memory: :mod:`bridgecore.memory`, one rank or many; offline: :mod:`bridgecore.offline`;
weight streaming: :mod:`bridgecore.streaming`) only execute it, so a hook or a check cannot run on one path and be
missed by the other:

- the layout check runs when the plan is made, before any process group, file or tensor;
- ``table`` holds the plugin's ``mappings`` and every plugin's ``quant_mappings``;
- :meth:`ConversionPlan.prepare` runs every plugin's ``prepare_model`` on each built chunk;
- ``passthrough`` names what the plugin keeps verbatim: left out of strict coverage, kept beside a
  Megatron checkpoint and copied unchanged into every HF export;
- :meth:`ConversionPlan.cover` checks strict coverage, waiving the user's ``--allow-unmapped``;
- :meth:`ConversionPlan.hf_writer` lays out the HF export, restoring the source's shard files, and
  :meth:`ConversionPlan.write_hf` writes it with every rank (or process) that shares the work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from bridgecore.errors import BridgeError
from bridgecore.hf.writer import DEFAULT_MAX_SHARD_SIZE, PlanEntry, ShardedWriter
from bridgecore.mapping import Copies, MappingTable
from bridgecore.mapping.table import Coverage
from bridgecore.megatron import parallel
from bridgecore.megatron.dcp import PASSTHROUGH, QUANTIZED
from bridgecore.megatron.parallel import Layout
from bridgecore.plugins import Plugins


class Checkpoint(Protocol):
    """What a plan reads of the bridge that made it (:class:`bridgecore.plan.bridge.Bridge`)."""

    plugins: Plugins
    config: Any
    hf_keys: frozenset[str]
    hf_dir: Path | None
    hf_config: dict[str, Any]
    reader: Any
    source: Any
    passthrough_reader: Any
    megatron_keys: frozenset[str] | None


@dataclass
class ConversionPlan:
    """What one conversion of ``bridge`` at ``layout`` does; see the module docstring."""

    bridge: Checkpoint
    layout: Layout
    table: MappingTable
    #: HF tensors the plugin keeps verbatim (its ``passthrough`` hook), in source order.
    passthrough: list[str]
    #: the user's ``--allow-unmapped`` globs.
    allow_unmapped: tuple[str, ...] = ()
    #: what the last coverage check waived by ``allow_unmapped`` (never passthrough tensors), to report.
    waived: list[str] = field(default_factory=list)

    def prepare(self, chunks: Iterable[torch.nn.Module]) -> None:
        """Every plugin's ``prepare_model`` on each freshly built chunk, before weights are loaded."""
        bridge = self.bridge
        for chunk in chunks:
            bridge.plugins.call_all(
                "prepare_model",
                model=chunk,
                config=bridge.config,
                hf_keys=bridge.hf_keys,
                table=self.table,
                source=bridge.reader or bridge.source,
                megatron_keys=bridge.megatron_keys,
            )

    def cover(
        self, megatron_names: Sequence[str], hf_keys: frozenset[str] | None, allow_unmapped: Sequence[str] = ()
    ) -> Coverage:
        """Strict coverage of the model's params and (with ``hf_keys``, on import) the checkpoint's
        tensors; passthrough tensors are not the user's waiver and are not reported as one."""
        kept = set(self.passthrough if hf_keys else ())
        waivers = (*self.allow_unmapped, *allow_unmapped)
        coverage = self.table.cover(
            megatron_names, hf_keys, [*waivers, *(_literal(n) for n in self.passthrough if hf_keys)]
        )
        self.waived = sorted(n for n in coverage.waived_hf + coverage.waived_megatron if n not in kept)
        return coverage

    def keep_beside(self, ckpt_dir: Path) -> None:
        """Write into ``ckpt_dir``, beside the Megatron weights, the passthrough tensors (``passthrough/``)
        and a quantized source's block scales (``quantized/``)."""
        bridge = self.bridge
        _keep(ckpt_dir / PASSTHROUGH, self.passthrough, bridge.source, self.copy_passthrough)
        _keep(ckpt_dir / QUANTIZED, bridge.scale_names(), bridge.scales, self.copy_scales)

    def write_hf(
        self,
        out_dir: Path,
        entries: Sequence[PlanEntry],
        max_shard_size: int | None,
        write: Callable[[ShardedWriter, Copies], None],
        overwrite: bool = False,
    ) -> None:
        """The HF export ``entries``, written by every rank of the current process group (or by this
        process alone): rank 0 makes the writer's temporary directory, each rank attaches to it and runs
        ``write`` (its share; it writes only the pieces :meth:`Copies.keep` keeps), rank 0 adds the
        passthrough tensors and, once every share is written and every copy of a broadcast tensor found
        equal, commits, then says what the mappings noted. A failure on any rank fails every rank and
        leaves ``out_dir`` as it was."""
        rank = parallel.rank()
        writer = None
        copies = Copies()
        try:
            if rank == 0:
                writer = self.hf_writer(out_dir, entries, max_shard_size)
                writer.create()
            temp = parallel.broadcast_object(writer.temp_dir if writer else None)
            if writer is None:
                writer = self.hf_writer(out_dir, entries, max_shard_size, temp)

            def share() -> None:
                write(writer, copies)
                if rank == 0:
                    self.copy_passthrough(writer)
                    if self.bridge.export_scales:
                        self.copy_scales(writer)

            parallel.collective(share)
            written = parallel.all_gather_objects(writer.written())
            digests = parallel.all_gather_objects(copies.digests)
            notes = parallel.all_gather_objects(copies.notes)

            def commit() -> None:
                if rank != 0:
                    return
                Copies.check(digests)
                writer.commit(
                    written, side_files_from=self.bridge.hf_dir, overwrite=overwrite, config=self.bridge.export_config()
                )

            parallel.collective(commit)
        except BaseException:
            if writer is not None and rank == 0:
                writer.abort()
            raise
        if rank == 0:
            for line in Copies.said(notes):
                print(f"note: {line}", flush=True)

    def copy_passthrough(self, writer: ShardedWriter) -> None:
        """Copy the passthrough tensors unchanged into ``writer`` (an HF export or ``passthrough/``)."""
        reader = self.bridge.passthrough_reader
        if self.passthrough and reader is None:
            raise BridgeError(
                f"{len(self.passthrough)} passthrough tensors (e.g. {self.passthrough[0]}) have no copy to export from"
            )
        for name in self.passthrough:
            writer.write(name, reader.read(name, ()))

    def copy_scales(self, writer: ShardedWriter) -> None:
        """Copy a quantized source's block scales unchanged into ``writer``."""
        for name in self.bridge.scale_names():
            writer.write(name, self.bridge.scales.read(name, ()))

    def hf_writer(
        self, out_dir: Path, entries: Sequence[PlanEntry], max_shard_size: int | None, temp_dir: Path | None = None
    ) -> ShardedWriter:
        """The writer of the HF export ``entries``: shards of ``max_shard_size`` when one is given;
        otherwise the source's files when every tensor has one there (same file names, each with its
        tensors in source order, and the index), else shards of the default size. With ``temp_dir`` it
        attaches to the one another rank created."""
        source = self.bridge.source
        files = source.files_of([name for name, _, _ in entries]) if source and max_shard_size is None else None
        max_shard_size = DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size
        if temp_dir is None:
            return ShardedWriter(out_dir, entries, max_shard_size, files, source.index_metadata if files else None)
        return ShardedWriter.attach(out_dir, entries, max_shard_size, temp_dir, files)


def _literal(name: str) -> str:
    """A glob matching exactly ``name``, even when it holds glob characters."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _keep(out_dir: Path, names: list[str], source: Any, copy: Callable[[ShardedWriter], None]) -> None:
    """The tensors ``names`` of ``source``, written by ``copy`` as an HF checkpoint ``out_dir``; none: nothing."""
    if not names:
        return
    writer = ShardedWriter(out_dir, [(n, source.shape(n), source.dtype(n)) for n in names])
    writer.create()
    try:
        copy(writer)
        writer.commit([writer.written()])
    except BaseException:
        writer.abort()
        raise
