"""The in-memory executor: the Megatron model on this process's ranks, loaded from HF or from a
Megatron checkpoint, saved as either (all ranks together, under torchrun or alone)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from bridgecore.casting import exact_cast
from bridgecore.errors import BridgeError
from bridgecore.hf.writer import ShardedWriter, check_target, parse_size
from bridgecore.mapping import Copies
from bridgecore.megatron import parallel, training
from bridgecore.megatron.checkpoint import load_dist, save_dist
from bridgecore.plan.bridge import Bridge, Model
from bridgecore.progress import track


class AutoBridge(Bridge):
    """One HF checkpoint and the Megatron model it converts to and from, in this process's memory."""

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

    def save_megatron(self, model: Model, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Save ``model`` as a torch_dist checkpoint Megatron-LM can ``--load`` (all ranks call)."""
        plan = self.conversion_for()
        save_dist(model, Path(out_dir), self.megatron_meta(), self.hf_dir, overwrite, extra=plan.keep_beside)
        return Path(out_dir)

    def load_megatron(self, model: Model, ckpt_dir: str | Path, iteration: int | None = None) -> None:
        """Load a Megatron checkpoint's model weights: ``bridgecore import`` output, or a Megatron-LM /
        Megatron-Bridge training run's (``iteration``, default the tracker's; optimizer and RNG
        state are never read). Its sizes and keys are checked against this bridge's config first."""
        load_dist(model, parallel.collective(training.torch_dist_dir, ckpt_dir, iteration), self.config)

    def save_hf_pretrained(
        self, model: Model, out_dir: str | Path, *, max_shard_size: int | str | None = None, overwrite: bool = False
    ) -> Path:
        """Write the HF checkpoint, all writer ranks in parallel; ``out_dir`` appears when complete.

        Without ``max_shard_size`` the source checkpoint's own files are restored where it is known,
        else shards of 5 GB; with it, shards of at most that size."""
        out_dir = Path(out_dir)
        parallel.collective(check_target, out_dir, overwrite)
        bound = parallel.collective(self.bind, model, None)
        plan = parallel.collective(self.export_entries, bound)
        conversion = self.conversion_for()

        named = {t.name: t for t, _ in bound}

        def write(writer: ShardedWriter, copies: Copies) -> None:
            for t, b in track(bound, "export", "tensor", enabled=parallel.rank() == 0):
                pieces = self.pieces(t, b, named)
                if t.writer:
                    for p in pieces:
                        if copies.keep(p):
                            writer.write(p.name, p.tensor, expert=p.expert)

        size = None if max_shard_size is None else parse_size(max_shard_size)
        conversion.write_hf(out_dir, plan, size, write, overwrite)
        return out_dir


def _can_take(param: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether ``param`` (a tensor of its own, not a view) can take ``value`` as its data unchanged."""
    return (
        param._base is None
        and value.is_contiguous()
        and value.dtype == param.dtype
        and value.device == param.device
        and tuple(value.shape) == tuple(param.shape)
    )
