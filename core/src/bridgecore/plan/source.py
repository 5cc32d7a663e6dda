"""The record of a source HF checkpoint that export restores: names, shapes, dtypes and files."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bridgecore.hf.reader import INDEX_FILE, CheckpointReader


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
        tensors = {k: (tuple(reader.shape(k)), reader.dtype(k)) for k in reader.keys()}
        return cls(
            tensors,
            # a reader may hide tensors it applies to others (a quantized weight's scales)
            {k: reader.file_of(k).name for k in (document["weight_map"] if document else tensors) if k in tensors},
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
