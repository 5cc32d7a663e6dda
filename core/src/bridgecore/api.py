"""What each ``bridgecore`` command does, as functions of the public API (``from bridgecore import ...``).

The CLI parses its arguments, calls one of these and prints; a Python caller gets the same checks,
the same outputs and the same one-line errors. Functions that report progress take ``say``, called
with each line the command prints (``print`` by default; under torchrun the CLI passes one that
prints on rank 0 only). Every function that writes refuses an output that is, contains or lies
inside its input, and an existing output unless ``overwrite``.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridgecore import adapters
from bridgecore.compare import LogitsParity, Report, compare_checkpoints, nonfinite
from bridgecore.errors import BridgeError
from bridgecore.hf.writer import DEFAULT_MAX_SHARD_SIZE, leftover_temporaries, temporary_prefix
from bridgecore.megatron import parallel
from bridgecore.megatron.dcp import META, RELEASE
from bridgecore.megatron.parallel import Layout
from bridgecore.memory import AutoBridge, Model
from bridgecore.offline import stream_to_hf, stream_to_megatron
from bridgecore.plugins import install_hint

Say = Callable[[str], None]

#: the Megatron config fields ``inspect`` shows (MoE ones only for MoE models).
INSPECTED = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "ffn_hidden_size",
    "num_moe_experts",
    "moe_router_topk",
    "moe_ffn_hidden_size",
    "mtp_num_layers",
    "vocab_size",
    "params_dtype",
    "share_embeddings_and_output_weights",
)


# -- inputs and outputs ---------------------------------------------------------------------------
def hf_checkpoint(path: str | Path) -> Path:
    """``path``, after refusing a Megatron checkpoint given where an HF one is expected."""
    path = Path(path)
    if not (path / "config.json").exists() and ((path / RELEASE).is_dir() or (path / META).is_file()):
        raise BridgeError(
            f"{path}: is a Megatron torch_dist checkpoint, not an HF one (no config.json);"
            f" to convert it to HF run `bridgecore export {path} OUT_DIR`"
        )
    return path


def check_apart(source: str | Path, out: str | Path) -> None:
    """Refuse an output that is the input, lies inside it, or contains it: replacing it (overwrite)
    or writing into it would destroy the checkpoint being read."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        relation = "is" if src == dst else "lies inside" if src in dst.parents else "contains"
        raise BridgeError(f"{out}: {relation} the input {source}; expected an output directory apart from the input")


def leftovers_note(target: str | Path) -> str | None:
    """A note naming the temporaries interrupted runs left beside ``target``, or None. They are never
    deleted automatically: another run may still be writing one."""
    target = Path(target)
    found = leftover_temporaries(target)
    if not found:
        return None
    names = ", ".join(p.name for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return f"{target.parent} holds {names}, left by interrupted runs; delete them once no run writes there"


def open_hf(
    hf_dir: str | Path, plugin: str | None = None, params_dtype: Any = None, say: Say | None = None
) -> AutoBridge:
    """The bridge of an HF checkpoint directory (``params_dtype``: a torch dtype or its name); ``say``
    gets the notes of what the conversion decided on its own (e.g. MTP the checkpoint lacks)."""
    import torch

    dtype = getattr(torch, params_dtype) if isinstance(params_dtype, str) else params_dtype
    bridge = AutoBridge.from_hf_pretrained(hf_checkpoint(hf_dir), plugin=plugin, params_dtype=dtype)
    for note in bridge.notes:
        (say or print)(f"note: {note}")
    return bridge


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def waived_report(bridge: AutoBridge) -> list[str]:
    """What ``allow_unmapped`` left out, and, apart from it, what the plugin keeps verbatim."""
    lines = []
    if bridge.waived:
        lines.append(f"--allow-unmapped: left {len(bridge.waived)} unmapped: {_shown(bridge.waived)}")
    kept = bridge.conversion.passthrough if bridge.conversion else []
    if kept:
        lines.append(
            f"passthrough: plugin {bridge.plugin.name} keeps {len(kept)} HF tensors verbatim,"
            f" not converted: {_shown(kept)}"
        )
    return lines


# -- the commands ---------------------------------------------------------------------------------
def import_checkpoint(
    bridge: AutoBridge,
    out_dir: str | Path,
    layout: Layout | None = None,
    *,
    offline: bool = False,
    allow_unmapped: Sequence[str] = (),
    overwrite: bool = False,
    threads: int = 2,
    say: Say = print,
) -> Path:
    """HF -> Megatron torch_dist at ``layout``: in memory (every rank its own slices), or ``offline``
    (no model, one tensor at a time; under torchrun each process writes a share)."""
    out_dir, layout = Path(out_dir), layout or Layout()
    if bridge.hf_dir is not None:
        check_apart(bridge.hf_dir, out_dir)
    if offline:
        stream_to_megatron(bridge, out_dir, layout, allow_unmapped=allow_unmapped, overwrite=overwrite, threads=threads)
        for line in waived_report(bridge):
            say(line)
        return out_dir
    model = bridge.to_megatron_model(layout, load_weights=False, allow_unmapped=allow_unmapped)
    bridge.load_hf_weights(model, allow_unmapped=allow_unmapped, share_source=True)
    for line in waived_report(bridge):
        say(line)
    bridge.save_megatron(model, out_dir, overwrite=overwrite)
    return out_dir


def export_checkpoint(
    megatron_dir: str | Path,
    hf_dir: str | Path,
    layout: Layout | None = None,
    *,
    offline: bool = False,
    plugin: str | None = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    hf_config: str | Path | None = None,
    iteration: int | None = None,
    quant: str | None = None,
) -> Path:
    """Megatron torch_dist (any saved layout) -> HF. ``hf_config`` names the model's HF checkpoint for a
    checkpoint bridgecore did not write (a training run's ``iteration``); ``quant`` also quantizes
    (a format of an installed plugin's ``export_formats``, e.g. ``fp8``)."""
    megatron_dir, target = Path(megatron_dir), Path(hf_dir)
    check_apart(megatron_dir, target)
    if offline:
        if quant:
            raise BridgeError("--offline writes the checkpoint's own dtypes; --quant needs the in-memory export")
        return stream_to_hf(
            megatron_dir,
            target,
            plugin=plugin,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            hf_config=hf_config,
            iteration=iteration,
        )
    if hf_config is not None:
        bridge = AutoBridge.from_training_run(hf_config, megatron_dir, iteration, plugin=plugin)
    else:
        bridge = AutoBridge.from_megatron_checkpoint(megatron_dir, plugin=plugin)
    model = bridge.to_megatron_model(layout or Layout(), load_weights=False)
    bridge.load_megatron(model, megatron_dir, iteration=iteration)
    return save_hf(bridge, model, target, quant=quant, max_shard_size=max_shard_size, overwrite=overwrite)


def save_hf(
    bridge: AutoBridge,
    model: Model,
    target: Path,
    *,
    quant: str | None = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
) -> Path:
    """``model`` as the HF checkpoint ``target``, in the ``quant`` format of an installed plugin when given
    (all ranks call)."""
    if not quant:
        return bridge.save_hf_pretrained(model, target, max_shard_size=max_shard_size, overwrite=overwrite)
    formats = {k: v for d in bridge.plugins.call_all("export_formats") for k, v in (d or {}).items()}
    if quant not in formats:
        raise BridgeError(f"--quant {quant}: no installed plugin offers it; {install_hint('bridgecore-quant')}")
    # The calibrated export is staged beside the target (same filesystem), on rank 0's choice, with
    # the block scales of a quantized source it was imported from (for this save only: the bridge may
    # be the caller's, and its plain exports stay plain).
    rank = parallel.rank()
    made = tempfile.mkdtemp(prefix=temporary_prefix(target, "staging"), dir=target.parent) if rank == 0 else None
    staging = Path(parallel.broadcast_object(made))
    bridge.export_scales = True
    try:
        bridge.save_hf_pretrained(model, staging / "calibrated", max_shard_size=max_shard_size)
        if rank == 0:
            # a quantized export has other tensors than the source: sharded by size
            size = max_shard_size or DEFAULT_MAX_SHARD_SIZE
            formats[quant](staging / "calibrated", target, overwrite, max_shard_size=size)
    finally:
        bridge.export_scales = False
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def export_adapter(
    megatron_dir: str | Path,
    peft_dir: str | Path,
    base: str | Path,
    *,
    alpha: float | None = None,
    iteration: int | None = None,
    plugin: str | None = None,
    merge: bool = False,
    exclude: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    """Megatron LoRA adapter (Megatron-Bridge's layout, saved at any layout) -> HF PEFT directory for the
    HF model ``base``, reading no base weight; with ``merge``, the base HF checkpoint with the adapter
    merged into its weights. ``alpha`` is needed where no ``adapter.json`` records it."""
    check_apart(megatron_dir, peft_dir)
    check_apart(base, peft_dir)
    return adapters.export_adapter(
        megatron_dir,
        peft_dir,
        hf_checkpoint(base),
        alpha=alpha,
        iteration=iteration,
        plugin=plugin,
        merge=merge,
        exclude=exclude,
        overwrite=overwrite,
    )


def import_adapter(
    peft_dir: str | Path,
    megatron_dir: str | Path,
    base: str | Path,
    layout: Layout | None = None,
    *,
    plugin: str | None = None,
    overwrite: bool = False,
) -> Path:
    """HF PEFT LoRA directory -> Megatron adapter weights (Megatron-Bridge's layout, torch_dist chunked
    for ``layout``) for the HF model ``base``, reading no base weight."""
    check_apart(peft_dir, megatron_dir)
    check_apart(base, megatron_dir)
    return adapters.import_adapter(
        peft_dir, megatron_dir, hf_checkpoint(base), layout, plugin=plugin, overwrite=overwrite
    )


def roundtrip(
    bridge: AutoBridge,
    layout: Layout | None = None,
    *,
    keep: str | Path | None = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    allow_unmapped: Sequence[str] = (),
    say: Say = print,
) -> Report | None:
    """HF -> Megatron -> HF at ``layout`` and the per-tensor comparison with the source (rank 0; None on
    the other ranks). The export is kept in ``keep`` if given, else discarded."""
    if keep is not None and bridge.hf_dir is not None:
        check_apart(bridge.hf_dir, keep)
    # a quantized release is compared with its own format written again
    quant = bridge.quantization.FORMAT if bridge.quantization else None
    if bridge.quantization and quant is None:
        raise BridgeError(
            f"{bridge.hf_dir}: {bridge.quantization.describe()} is read, not written, by bridgecore, so a round"
            " trip cannot give it back; compare its plain export's logits with `bridgecore verify` instead"
        )
    model = bridge.to_megatron_model(layout or Layout(), allow_unmapped=allow_unmapped)
    for line in waived_report(bridge):
        say(line)
    work = Path(
        parallel.broadcast_object(tempfile.mkdtemp(prefix="bridgecore-roundtrip-") if parallel.rank() == 0 else None)
    )
    try:
        out = Path(keep) if keep else work / "hf"
        save_hf(bridge, model, out, quant=quant, max_shard_size=max_shard_size, overwrite=bool(keep) and overwrite)
        if parallel.rank() != 0:
            return None
        return compare_checkpoints(Path(bridge.hf_dir), out)
    finally:
        # the save is collective: once it returns (or fails) on rank 0, no rank writes there any more
        if parallel.rank() == 0:
            shutil.rmtree(work, ignore_errors=True)


def verify(
    hf_dir: str | Path,
    layout: Layout | None = None,
    *,
    plugin: str | None = None,
    rtol: float = 1e-4,
    seq_len: int = 16,
    seed: int = 0,
    say: Say = print,
) -> LogitsParity | None:
    """Megatron's logits (fp32, at ``layout``'s TP/EP) against the plugin's transformers reference on
    ``seq_len`` seeded tokens; an error unless both are finite and max |difference| / max |reference|
    is at most ``rtol``. Returns the comparison on rank 0 (None on the others)."""
    import torch

    from bridgecore.megatron.compat import cpu_compat

    layout = layout or Layout()
    if layout.pp > 1 or layout.vpp:
        flags = f"--pp {layout.pp}" + (f" --vpp {layout.vpp}" if layout.vpp else "")
        raise BridgeError(
            f"verify {flags}: logits across pipeline stages need megatron-core's training schedule,"
            " which verify does not run; check PP layouts with roundtrip, verify at --tp/--ep"
        )
    if not rtol > 0:
        raise BridgeError(f"--rtol {rtol}: expected a positive relative tolerance")
    bridge = open_hf(hf_dir, plugin, torch.float32, say)
    try:
        import transformers  # noqa: F401 - the plugins' reference forwards need it
    except ImportError:
        raise BridgeError(
            f"verify compares against transformers, which is not installed;"
            f" pip install '{bridge.plugin.distribution}[verify]'"
        ) from None
    reference = bridge.plugins.call_owned("hf_reference", bridge.plugin, hf_config=bridge.hf_config)
    if reference is None:
        raise BridgeError(f"plugin {bridge.plugin.name} offers no reference forward for this checkpoint")
    model = bridge.to_megatron_model(layout)
    tokens = torch.randint(0, bridge.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seed))

    def forward() -> torch.Tensor:
        with cpu_compat(), torch.no_grad():
            return bridge.config.forward_logits(model[0], tokens).float()

    ours = parallel.collective(forward)  # every rank takes part in the TP and EP collectives

    def compare() -> LogitsParity | None:
        if parallel.rank() != 0:
            return None
        theirs = reference(Path(hf_dir), tokens)
        broken = [
            found for logits, side in ((ours, "Megatron"), (theirs, "reference")) if (found := nonfinite(logits, side))
        ]
        if broken:
            raise BridgeError(f"{hf_dir}: {'; '.join(broken)}; expected finite logits on both sides")
        parity = LogitsParity.of(ours, theirs)
        say(
            f"logits {list(ours.shape)} at {layout}: max abs diff {parity.max_abs_diff:.3e}"
            f" (mean {parity.mean_abs_diff:.3e}) against a largest reference |logit| of {parity.scale:.3g}:"
            f" relative {parity.relative:.3e}, tolerance {rtol:g}; argmax agreement {parity.argmax_agreement:.1%}"
        )
        if not parity.passes(rtol):
            raise BridgeError(
                f"{hf_dir}: Megatron logits differ from the transformers reference by {parity.relative:.3e} of the"
                f" largest reference logit, above the tolerance {rtol:g} (--rtol)"
            )
        return parity

    return parallel.collective(compare)


@dataclass
class Inspection:
    """What ``inspect`` found: the bridge, the Megatron config fields, and one row per Megatron param
    (its name, mapping type and HF tensors), or, for an incomplete table, ``gaps`` and the rows with
    every gap marked, and the ``error`` coverage raised."""

    bridge: AutoBridge
    fields: list[tuple[str, Any]]
    rows: list[tuple[str, str, list[str]]]
    coverage: str = ""
    waived: list[str] = field(default_factory=list)
    unmapped_hf: list[str] = field(default_factory=list)
    gaps: int = 0
    error: BridgeError | None = None
    #: the checkpoint's quantization, as lines (none when it is not quantized)
    quantization: list[str] = field(default_factory=list)


def inspect(
    hf_dir: str | Path, plugin: str | None = None, allow_unmapped: Sequence[str] = (), say: Say | None = None
) -> Inspection:
    """The plugin, Megatron config and full mapping table of a checkpoint, from a model built on the
    meta device (no memory); an incomplete table comes back with its gaps marked and ``error`` set."""
    from bridgecore.megatron.params import local_tensors

    bridge = open_hf(hf_dir, plugin, say=say)
    quantization = quantization_summary(bridge)
    c = bridge.config
    fields = [
        (f, getattr(c, f, None))
        for f in INSPECTED
        # megatron-core's MoE defaults mean nothing for a dense model
        if not (f.startswith("moe_") and not getattr(c, "num_moe_experts", None))
    ]
    model = bridge.to_megatron_model(Layout(), load_weights=False, meta=True, allow_unmapped=allow_unmapped)
    try:
        bound = bridge.bind(model, bridge.hf_keys)
    except BridgeError as err:
        table = bridge.mapping_table()
        names = [t.name for t in local_tensors(model, bridge.config) if not bridge.embedding_copy(t)]
        rows, used, gaps = [], set(), 0
        for name in names:
            try:
                b = table.find(name)
            except BridgeError:
                kind, hf = "AMBIGUOUS", ["(several mappings match)"]
            else:
                kind, hf = (type(b.mapping).__name__, b.hf) if b else ("NO MAPPING", [])
            used.update(hf)
            marked = [n if n in bridge.hf_keys or not bridge.hf_keys else f"{n} (NOT IN CHECKPOINT)" for n in hf]
            gaps += kind in ("AMBIGUOUS", "NO MAPPING") or marked != hf
            rows.append((name, kind, marked))
        unused = sorted(bridge.hf_keys - used)
        return Inspection(bridge, fields, rows, unmapped_hf=unused, gaps=gaps, error=err, quantization=quantization)
    rows = [(t.name, type(b.mapping).__name__, b.hf) for t, b in bound]
    used = {n for _, b in bound for n in b.hf}
    kept = len(bridge.conversion.passthrough)
    coverage = f"coverage: {len(bound)} Megatron tensors <- {len(used)} of {len(bridge.hf_keys)} HF tensors" + (
        f"; {kept} kept verbatim (passthrough)" if kept else ""
    )
    return Inspection(bridge, fields, rows, coverage, waived=waived_report(bridge), quantization=quantization)


def quantization_summary(bridge: AutoBridge) -> list[str]:
    """What a quantized checkpoint holds, for ``inspect``: the method, its blocks, and which weights
    (layer numbers as ``*``)."""
    q = bridge.quantization
    if q is None:
        return []
    weights = bridge.quantized_weights()
    kinds = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in weights})
    dtype = str(bridge.config.params_dtype).removeprefix("torch.")
    return [
        f"quantization  {q.describe()}: {len(weights)} weights read dequantized to {dtype}"
        + (f"; written again by export --quant {q.FORMAT}" if q.FORMAT else ""),
        *(f"  {kind}" for kind in kinds),
    ]
