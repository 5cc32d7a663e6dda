"""The ``bridgecore`` command. Run it as ``bridgecore``, ``python -m bridgecore`` or
``torchrun --nproc-per-node N -m bridgecore`` for multi-rank conversion (gloo on CPU)."""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bridgecore import __version__
from bridgecore.errors import BridgeError

if TYPE_CHECKING:
    from bridgecore.bridge import AutoBridge
    from bridgecore.plugins import PluginInfo

SHARD_HELP = (
    "largest safetensors file, e.g. 5GB; without it the source checkpoint's own files (names, split, index)"
    " are restored where known, else 5GB shards"
)
#: --params-dtype choices, torch dtype names (torch is imported only by the commands that convert).
DTYPES = ("bfloat16", "float16", "float32")

EPILOG = """examples:
  bridgecore demo                                   convert every installed family's tiny model
  bridgecore inspect ./Step-3.5-Flash               plugin, Megatron config, full mapping table
  bridgecore import ./hf ./megatron                 HF -> torch_dist (Megatron-LM --load)
  torchrun --nproc-per-node 4 -m bridgecore import ./hf ./megatron --tp 2 --ep 2
  bridgecore export ./megatron ./hf-out             torch_dist -> HF (any saved layout)
  bridgecore export ./trained ./hf-out --hf-config ./hf --iteration 1000   a Megatron-LM run's iteration
  bridgecore import ./hf ./megatron --offline --tp 8 --ep 8   no model in memory, one tensor at a time
  torchrun --nproc-per-node 2 -m bridgecore roundtrip ./hf --tp 2   HF -> Megatron -> HF, bit-exact check
  bridgecore verify ./hf                            Megatron logits vs the transformers reference
"""


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def say(*args: object) -> None:
    if _rank() == 0:
        print(*args, flush=True)


def _note_leftovers(target: Path) -> None:
    """Name the temporaries that interrupted runs left beside ``target``; they are never deleted
    automatically, since another run may still be writing one."""
    from bridgecore.hf.writer import leftover_temporaries

    found = leftover_temporaries(target) if _rank() == 0 else []
    if found:
        names = ", ".join(p.name for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        say(f"note: {target.parent} holds {names}, left by interrupted runs; delete them once no run writes there")


def _apart(source: Path, out: Path) -> None:
    """Refuse an output that is the input, lies inside it, or contains it: replacing it (--overwrite)
    or writing into it would destroy the checkpoint being read."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        relation = "is" if src == dst else "lies inside" if src in dst.parents else "contains"
        raise BridgeError(f"{out}: {relation} the input {source}; expected an output directory apart from the input")


def _layout_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallel layout (world size = torchrun's --nproc-per-node)")
    g.add_argument("--tp", type=int, default=1, help="tensor parallel size (default 1)")
    g.add_argument("--pp", type=int, default=1, help="pipeline parallel size (default 1)")
    g.add_argument("--ep", type=int, default=1, help="expert parallel size (default 1)")
    g.add_argument("--etp", type=int, default=1, help="expert tensor parallel size (default 1)")
    g.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per PP rank (default none)")


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", help="use this plugin when several claim the architecture")
    p.add_argument("--params-dtype", choices=sorted(DTYPES), help="Megatron param dtype (default: the checkpoint's)")
    p.add_argument(
        "--allow-unmapped",
        action="append",
        default=[],
        metavar="PATTERN",
        help="glob of HF tensors or Megatron params to leave unmapped (repeatable); reported",
    )


def _layout(args: argparse.Namespace):
    from bridgecore.megatron.parallel import Layout

    return Layout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, vpp=args.vpp)


def _hf_input(path: Path) -> Path:
    """``path``, after refusing a Megatron checkpoint given where an HF one is expected."""
    from bridgecore.megatron.checkpoint import META, RELEASE

    if not (path / "config.json").exists() and ((path / RELEASE).is_dir() or (path / META).is_file()):
        raise BridgeError(
            f"{path}: is a Megatron torch_dist checkpoint, not an HF one (no config.json);"
            f" to convert it to HF run `bridgecore export {path} OUT_DIR`"
        )
    return path


def _bridge(args: argparse.Namespace):
    import torch

    from bridgecore.bridge import AutoBridge

    _hf_input(args.hf_dir)
    dtype = getattr(torch, args.params_dtype) if getattr(args, "params_dtype", None) else None
    return _say_notes(AutoBridge.from_hf_pretrained(args.hf_dir, plugin=args.plugin, params_dtype=dtype))


def _say_notes(bridge: AutoBridge) -> AutoBridge:
    for note in bridge.notes:
        say(f"note: {note}")
    return bridge


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _report_waived(bridge: AutoBridge) -> None:
    """What ``--allow-unmapped`` left out, and, apart from it, what the plugin keeps verbatim."""
    if bridge.waived:
        say(f"--allow-unmapped: left {len(bridge.waived)} unmapped: {_shown(bridge.waived)}")
    kept = bridge.conversion.passthrough if bridge.conversion else []
    if kept:
        say(
            f"passthrough: plugin {bridge.plugin.name} keeps {len(kept)} HF tensors verbatim,"
            f" not converted: {_shown(kept)}"
        )


def cmd_plugins(args: argparse.Namespace) -> int:
    from bridgecore.plugins import install_hint, installed

    plugins = installed()
    if not plugins.infos:
        print(f"no plugins installed; {install_hint('bridgecore-<family>')} (step35, step37, qwen35, quant)")
    for info in plugins.infos.values():
        print(f"{info.name}  ({info.distribution} {info.version})")
        print(f"  architectures: {', '.join(info.architectures) or '-'}")
        print(f"  hooks:         {', '.join(info.hooks + [f'{h} (core default)' for h in info.defaults])}")
    for name, error in plugins.broken.items():
        print(f"{name}  BROKEN: {error}")
    for arch, owners in plugins.conflicts().items():
        print(f"conflict: {arch} is claimed by {' and '.join(o.name for o in owners)}; choose with --plugin")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from bridgecore.bridge import AutoBridge
    from bridgecore.megatron.parallel import Layout

    bridge = _say_notes(AutoBridge.from_hf_pretrained(_hf_input(args.hf_dir), plugin=args.plugin))
    c = bridge.config
    print(f"checkpoint  {args.hf_dir}")
    print(f"plugin      {bridge.plugin.name} ({bridge.plugin.distribution} {bridge.plugin.version})")
    fields = [
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
    ]
    for f in fields:
        if f.startswith("moe_") and not getattr(c, "num_moe_experts", None):
            continue  # megatron-core's MoE defaults mean nothing for a dense model
        print(f"  {f:40s} {getattr(c, f, None)}")
    model = bridge.to_megatron_model(Layout(), load_weights=False, meta=True, allow_unmapped=args.allow_unmapped)
    try:
        bound = bridge.bind(model, bridge.hf_keys)
    except BridgeError:
        _print_gaps(bridge, model)
        raise
    _report_waived(bridge)
    print(f"\n{'Megatron param':70s} {'mapping':16s} HF tensors")
    for t, b in bound:
        print(f"{t.name:70s} {type(b.mapping).__name__:16s} {', '.join(b.hf)}")
    used = {n for _, b in bound for n in b.hf}
    kept = len(bridge.conversion.passthrough)
    print(
        f"\ncoverage: {len(bound)} Megatron tensors <- {len(used)} of {len(bridge.hf_keys)} HF tensors"
        + (f"; {kept} kept verbatim (passthrough)" if kept else "")
    )
    return 0


def _print_gaps(bridge: AutoBridge, model: list) -> None:
    """The mapping table as far as it goes, every gap marked: what a plugin author fills in next."""
    from bridgecore.megatron.params import local_tensors

    table = bridge.mapping_table()
    names = [t.name for t in local_tensors(model, bridge.config) if not bridge.embedding_copy(t)]
    print(f"\n{'Megatron param':70s} {'mapping':16s} HF tensors  (incomplete: gaps marked)")
    used, gaps = set(), 0
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
        print(f"{name:70s} {kind:16s} {', '.join(marked)}".rstrip())
    unused = sorted(bridge.hf_keys - used)
    for n in unused:
        print(f"{'(no Megatron param)':70s} {'UNMAPPED HF':16s} {n}")
    print(f"\ngaps: {gaps} Megatron params, {len(unused)} HF tensors")


def cmd_import(args: argparse.Namespace) -> int:
    _apart(args.hf_dir, args.megatron_dir)
    _note_leftovers(Path(args.megatron_dir))
    bridge = _bridge(args)
    start = time.perf_counter()
    if args.offline:
        from bridgecore.offline import stream_to_megatron

        stream_to_megatron(
            bridge,
            args.megatron_dir,
            _layout(args),
            allow_unmapped=args.allow_unmapped,
            overwrite=args.overwrite,
            threads=args.threads,
        )
        _report_waived(bridge)
        say(
            f"imported {args.hf_dir} -> {args.megatron_dir} offline ({_layout(args)})"
            f" in {time.perf_counter() - start:.1f}s"
        )
        return 0
    model = bridge.to_megatron_model(_layout(args), load_weights=False, allow_unmapped=args.allow_unmapped)
    bridge.load_hf_weights(model, allow_unmapped=args.allow_unmapped, share_source=True)
    _report_waived(bridge)
    bridge.save_megatron(model, Path(args.megatron_dir), overwrite=args.overwrite)
    say(f"imported {args.hf_dir} -> {args.megatron_dir} ({_layout(args)}) in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bridgecore.bridge import AutoBridge

    _apart(args.megatron_dir, args.hf_dir)
    _note_leftovers(Path(args.hf_dir))
    start = time.perf_counter()
    if args.offline:
        if args.quant:
            raise BridgeError("--offline writes the checkpoint's own dtypes; --quant needs the in-memory export")
        from bridgecore.offline import stream_to_hf

        stream_to_hf(
            args.megatron_dir,
            args.hf_dir,
            plugin=args.plugin,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            hf_config=args.hf_config,
            iteration=args.iteration,
        )
        say(f"exported {args.megatron_dir} -> {args.hf_dir} offline in {time.perf_counter() - start:.1f}s")
        return 0
    if args.hf_config is not None:
        from bridgecore.megatron.training import bridge_for

        bridge = bridge_for(args.hf_config, args.megatron_dir, args.iteration, plugin=args.plugin)
    else:
        bridge = AutoBridge.from_megatron_checkpoint(args.megatron_dir, plugin=args.plugin)
    model = bridge.to_megatron_model(_layout(args), load_weights=False)
    bridge.load_megatron(model, Path(args.megatron_dir), iteration=args.iteration)
    target = Path(args.hf_dir)
    if args.quant:
        formats = {k: v for d in bridge.plugins.call_all("export_formats") for k, v in (d or {}).items()}
        if args.quant not in formats:
            from bridgecore.plugins import install_hint

            hint = install_hint("bridgecore-quant")
            raise BridgeError(f"--quant {args.quant}: no installed plugin offers it; {hint}")
        from bridgecore.hf.writer import DEFAULT_MAX_SHARD_SIZE, temporary_prefix
        from bridgecore.megatron import parallel

        # The calibrated export is staged beside the target (same filesystem), on rank 0's choice.
        made = tempfile.mkdtemp(prefix=temporary_prefix(target, "staging"), dir=target.parent) if _rank() == 0 else None
        staging = Path(parallel.broadcast_object(made))
        try:
            bridge.save_hf_pretrained(model, staging / "calibrated", max_shard_size=args.max_shard_size)
            if _rank() == 0:
                # a quantized export has other tensors than the source: sharded by size
                size = args.max_shard_size or DEFAULT_MAX_SHARD_SIZE
                formats[args.quant](staging / "calibrated", target, args.overwrite, max_shard_size=size)
        finally:
            if _rank() == 0:
                shutil.rmtree(staging, ignore_errors=True)
    else:
        bridge.save_hf_pretrained(model, target, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    say(f"exported {args.megatron_dir} -> {target} ({_layout(args)}) in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_roundtrip(args: argparse.Namespace) -> int:
    from bridgecore.compare import compare_checkpoints, print_report
    from bridgecore.megatron import parallel

    if args.keep:
        _apart(args.hf_dir, Path(args.keep))
        _note_leftovers(Path(args.keep))
    bridge = _bridge(args)
    model = bridge.to_megatron_model(_layout(args), allow_unmapped=args.allow_unmapped)
    _report_waived(bridge)
    work = Path(
        parallel.broadcast_object(tempfile.mkdtemp(prefix="bridgecore-roundtrip-") if parallel.rank() == 0 else None)
    )
    try:
        out = Path(args.keep) if args.keep else work / "hf"
        bridge.save_hf_pretrained(
            model, out, max_shard_size=args.max_shard_size, overwrite=bool(args.keep) and args.overwrite
        )
        if parallel.rank() != 0:
            return 0
        report = compare_checkpoints(Path(args.hf_dir), out)
    finally:
        # the save is collective: once it returns (or fails) on rank 0, no rank writes there any more
        if parallel.rank() == 0:
            shutil.rmtree(work, ignore_errors=True)
    print_report(report, verbose=args.verbose)
    say(f"layout {_layout(args)}; output {'kept in ' + str(out) if args.keep else 'discarded'}")
    return 0 if report.exact else 1


def cmd_verify(args: argparse.Namespace) -> int:
    import torch

    from bridgecore.bridge import AutoBridge
    from bridgecore.compare import LogitsParity, nonfinite
    from bridgecore.megatron import parallel
    from bridgecore.megatron.compat import cpu_compat

    layout = _layout(args)
    if layout.pp > 1 or layout.vpp:
        flags = f"--pp {layout.pp}" + (f" --vpp {layout.vpp}" if layout.vpp else "")
        raise BridgeError(
            f"verify {flags}: logits across pipeline stages need megatron-core's training schedule,"
            " which verify does not run; check PP layouts with roundtrip, verify at --tp/--ep"
        )
    if not args.rtol > 0:
        raise BridgeError(f"--rtol {args.rtol}: expected a positive relative tolerance")
    bridge = _say_notes(
        AutoBridge.from_hf_pretrained(_hf_input(args.hf_dir), plugin=args.plugin, params_dtype=torch.float32)
    )
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
    tokens = torch.randint(
        0, bridge.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(args.seed)
    )

    def forward() -> torch.Tensor:
        with cpu_compat(), torch.no_grad():
            return bridge.config.forward_logits(model[0], tokens).float()

    ours = parallel.collective(forward)  # every rank takes part in the TP and EP collectives

    def compare() -> None:
        if parallel.rank() != 0:
            return
        theirs = reference(Path(args.hf_dir), tokens)
        broken = [
            found for logits, side in ((ours, "Megatron"), (theirs, "reference")) if (found := nonfinite(logits, side))
        ]
        if broken:
            raise BridgeError(f"{args.hf_dir}: {'; '.join(broken)}; expected finite logits on both sides")
        parity = LogitsParity.of(ours, theirs)
        say(
            f"logits {list(ours.shape)} at {layout}: max abs diff {parity.max_abs_diff:.3e}"
            f" (mean {parity.mean_abs_diff:.3e}) against a largest reference |logit| of {parity.scale:.3g}:"
            f" relative {parity.relative:.3e}, tolerance {args.rtol:g}; argmax agreement {parity.argmax_agreement:.1%}"
        )
        if not parity.passes(args.rtol):
            raise BridgeError(
                f"{args.hf_dir}: Megatron logits differ from the transformers reference by {parity.relative:.3e} of the"
                f" largest reference logit, above the tolerance {args.rtol:g} (--rtol)"
            )

    parallel.collective(compare)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from bridgecore.demo import run_demo

    return run_demo(Path(args.out) if args.out else None, args.only, overwrite=args.overwrite)


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from bridgecore.scaffold import write_plugin

    out = args.out or Path(f"bridgecore-{args.name.replace('_', '-')}")
    for path in write_plugin(args.name, args.architecture, out):
        print(f"wrote {path}")
    print(f"next: pip install -e {out}; bridgecore inspect on its tiny model; adapt provider_config and mappings")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bridgecore",
        description="Exact, streaming checkpoint conversion between Hugging Face and Megatron-Core.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bridgecore {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plugins", help="installed plugins, versions, claimed architectures, hooks")
    p.set_defaults(fn=cmd_plugins)

    p = sub.add_parser(
        "inspect",
        help="which plugin, the Megatron config, the full mapping table with coverage",
        description="Builds the model on the meta device (no memory) and binds every param.",
    )
    p.add_argument("hf_dir", type=Path, help="HF checkpoint directory (config.json + safetensors)")
    _source_args(p)
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser(
        "import",
        help="HF checkpoint -> Megatron torch_dist checkpoint",
        description="Each rank reads only its slices; the output loads in Megatron-LM with --load.",
    )
    p.add_argument("hf_dir", type=Path)
    p.add_argument("megatron_dir", type=Path)
    _source_args(p)
    _layout_args(p)
    p.add_argument(
        "--offline",
        action="store_true",
        help="no model: stream each tensor into torch_dist chunked for the layout; one process, or under"
        " torchrun N processes (on shared storage) each writing a share",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="with --offline, writer threads, each writing its own .distcp file (default 2)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(fn=cmd_import)

    p = sub.add_parser(
        "export",
        help="Megatron torch_dist checkpoint -> HF checkpoint",
        description="Loads at any layout; writer ranks write their own tensors in parallel.",
    )
    p.add_argument("megatron_dir", type=Path)
    p.add_argument("hf_dir", type=Path)
    p.add_argument("--plugin")
    p.add_argument(
        "--hf-config",
        type=Path,
        metavar="PATH",
        help="the model's HF checkpoint directory (or its config.json), for a checkpoint bridgecore did not"
        " write (Megatron-LM / Megatron-Bridge training output); its safetensors headers, when present,"
        " give the names, layout and dtypes to write",
    )
    p.add_argument(
        "--iteration",
        type=int,
        metavar="N",
        help="export iter_NNNNNNN/ of a training run (default: the one latest_checkpointed_iteration.txt names)",
    )
    _layout_args(p)
    p.add_argument("--max-shard-size", help=SHARD_HELP)
    p.add_argument("--quant", help="also quantize: fp8 or nvfp4 (needs bridgecore-quant)")
    p.add_argument(
        "--offline",
        action="store_true",
        help="no model: read each param's chunks and stream it to HF (layout flags unused); one process,"
        " or under torchrun N processes each writing a share",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser(
        "roundtrip",
        help="HF -> Megatron -> HF and a bit-exact per-tensor comparison",
        description="Exit status 0 only if every tensor, dtype and shape comes back identical.",
    )
    p.add_argument("hf_dir", type=Path)
    _source_args(p)
    _layout_args(p)
    p.add_argument("--max-shard-size", help=SHARD_HELP)
    p.add_argument("--keep", metavar="DIR", help="keep the exported HF checkpoint in DIR")
    p.add_argument("--overwrite", action="store_true", help="with --keep, replace DIR")
    p.add_argument("--verbose", "-v", action="store_true", help="one line per tensor")
    p.set_defaults(fn=cmd_roundtrip)

    p = sub.add_parser(
        "verify",
        help="Megatron logits vs the plugin's transformers reference (CPU, fp32)",
        description="Passes when max |Megatron - reference| over all logits, divided by the largest"
        " |reference logit|, is at most --rtol; fails with exit status 2 otherwise. Under torchrun"
        " the Megatron model runs at --tp/--ep/--etp (PP is refused).",
    )
    p.add_argument("hf_dir", type=Path)
    p.add_argument("--plugin")
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rtol",
        type=float,
        default=1e-4,
        help="largest allowed max abs logit difference relative to the largest |reference logit| (default 1e-4)",
    )
    _layout_args(p)
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser("demo", help="tiny model of every installed family: generate, import, export, check")
    p.add_argument("--out", help="keep the generated checkpoints here (default: a temporary directory)")
    p.add_argument("--only", action="append", metavar="NAME", help="run only these tiny models (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="with --out, replace DIR/<model>/ from an earlier run")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser(
        "new-plugin",
        help="write a working plugin distribution for a transformers architecture, to adapt",
        description="pyproject with the entry point, the hooks module, tests using bridgecore.testing,"
        " README, CHANGELOG and noxfile; the tiny model and verify reference come from transformers' class.",
    )
    p.add_argument("name", help="plugin name (entry point; the distribution is bridgecore-NAME)")
    p.add_argument("--architecture", required=True, help="transformers model class, e.g. Qwen3ForCausalLM")
    p.add_argument("--out", type=Path, help="target directory (default ./bridgecore-NAME)")
    p.set_defaults(fn=cmd_new_plugin)
    for command in sub.choices.values():
        command.add_argument(
            "--traceback", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of any error"
        )
    return parser


class Terminated(BaseException):
    """SIGTERM arrived (torchrun stops every rank this way once one failed); unwinds like Ctrl-C,
    so every temporary this run made is removed on the way out."""


#: the interrupting signals this run received, in order: a write they cut short may report itself as
#: a failed write (torch.save's stream writer turns the exception into "unexpected pos ..."), so any
#: failure after one is reported as the interruption.
_received: list[int] = []
#: the error another rank published before this one was stopped (see ``parallel.first_error``).
_peer_error: list[str] = []


def _interrupt(signum: int, frame: object) -> None:
    _received.append(signum)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


def main(argv: Sequence[str] | None = None) -> int:
    if not sys.warnoptions:  # megatron-core warns about absent GPU libraries at import; -W shows them
        warnings.simplefilter("ignore")
    args = build_parser().parse_args(argv)
    _received.clear()
    _peer_error.clear()
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in handled}
    if main_thread:
        for s in handled:
            # a SIGINT ignored by whoever started us (a background job) stays ignored
            if s != signal.SIGINT or previous[s] is signal.default_int_handler:
                signal.signal(s, _interrupt)
    try:
        return _report(args)
    except KeyboardInterrupt:
        print(f"bridgecore: error: {_who()}interrupted (Ctrl-C); the output path was left as it was", file=sys.stderr)
        return 130
    except Terminated:
        print(
            f"bridgecore: error: {_who()}stopped by SIGTERM{_why_stopped()}; the output path was left as it was",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM
    finally:
        if main_thread:
            for s in handled:
                signal.signal(s, previous[s])


def _who() -> str:
    return f"rank {_rank()}: " if _under_torchrun() else ""


def _under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1"


def _why_stopped() -> str:
    if not _under_torchrun():
        return ""
    if _peer_error:
        return f" after {_peer_error[0]}"
    return " (under torchrun: another rank failed, and torchrun's report names it)"


def _run(args: argparse.Namespace) -> int:
    # bridgecore.megatron.parallel is in sys.modules once something set up a process group
    try:
        if args.command != "plugins":  # every other command converts or builds a model
            from bridgecore.megatron.compat import import_megatron_core

            import_megatron_core()
            # Python's full collections walk every tracked object, and torch and megatron-core leave
            # millions after import: 7-9% of a conversion's CPU went there. They live until exit anyway.
            gc.freeze()
        status = args.fn(args)
        if "bridgecore.megatron.parallel" in sys.modules:
            sys.modules["bridgecore.megatron.parallel"].leave()
        return status
    except BaseException:
        # a failed command drops its group too, without the final barrier: the other ranks may be gone
        if "bridgecore.megatron.parallel" in sys.modules:
            parallel = sys.modules["bridgecore.megatron.parallel"]
            found = parallel.first_error()
            if found and not found.startswith(f"rank {_rank()}: "):
                _peer_error.append(found)
            parallel.forget()
        raise


def _report(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except Exception as exc:
        if _received:
            raise (KeyboardInterrupt if _received[0] == signal.SIGINT else Terminated)() from exc
        return _failed(args, exc)


def _failed(args: argparse.Namespace, exc: Exception) -> int:
    """Print ``exc`` as one line (a plugin's failure named as such), or re-raise a core bug."""
    if isinstance(exc, BridgeError):
        if args.traceback:
            raise exc
        print(f"bridgecore: error: {exc}", file=sys.stderr)
        return 2
    culprit = None if args.traceback else _plugin_frame(exc)
    if culprit is None:  # a bug in the core stays a full traceback
        raise exc
    info, where = culprit
    message = " ".join(str(exc).split())[:300]
    print(
        f"bridgecore: error: plugin {info.name} ({info.distribution} {info.version}) failed at {where}:"
        f" {type(exc).__name__}: {message}; rerun with --traceback for details",
        file=sys.stderr,
    )
    return 2


def _plugin_frame(exc: BaseException) -> tuple[PluginInfo, str] | None:
    """The installed plugin whose code raised `exc` (the innermost plugin frame), and file:line, or None."""
    from bridgecore.plugins import installed

    infos = installed().infos.values()
    packages = {getattr(i.module, "__name__", type(i.module).__module__).split(".")[0]: i for i in infos}
    found = None
    for frame, line in traceback.walk_tb(exc.__traceback__):
        package = str(frame.f_globals.get("__name__", "")).split(".")[0]
        if package in packages:
            found = (packages[package], f"{Path(frame.f_code.co_filename).name}:{line}")
    return found
