"""The ``bridgecore`` command. Run it as ``bridgecore``, ``python -m bridgecore`` or
``torchrun --nproc-per-node N -m bridgecore`` for multi-rank conversion (gloo on CPU)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import bridgecore

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
    note = bridgecore.leftovers_note(target) if _rank() == 0 else None
    if note:
        say(f"note: {note}")


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


def _layout(args: argparse.Namespace) -> bridgecore.Layout:
    return bridgecore.Layout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, vpp=args.vpp)


def _bridge(args: argparse.Namespace) -> bridgecore.AutoBridge:
    return bridgecore.open_hf(args.hf_dir, args.plugin, getattr(args, "params_dtype", None), say)


def cmd_plugins(args: argparse.Namespace) -> int:
    plugins = bridgecore.installed()
    if not plugins.infos:
        hint = bridgecore.install_hint("bridgecore-<family>")
        print(f"no plugins installed; {hint} (step35, step37, qwen35, quant)")
    for info in plugins.infos.values():
        print(f"{info.name}  ({info.distribution} {info.version})")
        print(f"  architectures: {', '.join(info.architectures) or '-'}")
        print(f"  hooks:         {', '.join(info.hooks + [f'{h} (core default)' for h in info.defaults])}")
        adapters = "LoRA (export-adapter, import-adapter), from its mappings" if "mappings" in info.hooks else "-"
        print(f"  adapters:      {adapters}")
    for name, error in plugins.broken.items():
        print(f"{name}  BROKEN: {error}")
    for arch, owners in plugins.conflicts().items():
        print(f"conflict: {arch} is claimed by {' and '.join(o.name for o in owners)}; choose with --plugin")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    found = bridgecore.inspect(args.hf_dir, args.plugin, args.allow_unmapped, say)
    bridge = found.bridge
    print(f"checkpoint  {args.hf_dir}")
    print(f"plugin      {bridge.plugin.name} ({bridge.plugin.distribution} {bridge.plugin.version})")
    for line in found.quantization:
        print(line)
    for name, value in found.fields:
        print(f"  {name:40s} {value}")
    if found.error is not None:
        print(f"\n{'Megatron param':70s} {'mapping':16s} HF tensors  (incomplete: gaps marked)")
        for name, kind, hf in found.rows:
            print(f"{name:70s} {kind:16s} {', '.join(hf)}".rstrip())
        for n in found.unmapped_hf:
            print(f"{'(no Megatron param)':70s} {'UNMAPPED HF':16s} {n}")
        print(f"\ngaps: {found.gaps} Megatron params, {len(found.unmapped_hf)} HF tensors")
        raise found.error
    for line in found.waived:
        say(line)
    print(f"\n{'Megatron param':70s} {'mapping':16s} HF tensors")
    for name, kind, hf in found.rows:
        print(f"{name:70s} {kind:16s} {', '.join(hf)}")
    print(f"\n{found.coverage}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    bridgecore.check_apart(args.hf_dir, args.megatron_dir)
    _note_leftovers(Path(args.megatron_dir))
    bridge = _bridge(args)
    start = time.perf_counter()
    bridgecore.import_checkpoint(
        bridge,
        args.megatron_dir,
        _layout(args),
        offline=args.offline,
        allow_unmapped=args.allow_unmapped,
        overwrite=args.overwrite,
        threads=args.threads,
        say=say,
    )
    how = "offline " if args.offline else ""
    say(f"imported {args.hf_dir} -> {args.megatron_dir} {how}({_layout(args)}) in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    bridgecore.check_apart(args.megatron_dir, args.hf_dir)
    _note_leftovers(Path(args.hf_dir))
    start = time.perf_counter()
    target = bridgecore.export_checkpoint(
        args.megatron_dir,
        args.hf_dir,
        _layout(args),
        offline=args.offline,
        plugin=args.plugin,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        hf_config=args.hf_config,
        iteration=args.iteration,
        quant=args.quant,
    )
    if args.offline:
        say(f"exported {args.megatron_dir} -> {args.hf_dir} offline in {time.perf_counter() - start:.1f}s")
    else:
        say(f"exported {args.megatron_dir} -> {target} ({_layout(args)}) in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_export_adapter(args: argparse.Namespace) -> int:
    _note_leftovers(Path(args.peft_dir))
    start = time.perf_counter()
    bridgecore.export_adapter(
        args.megatron_dir,
        args.peft_dir,
        args.base,
        alpha=args.alpha,
        iteration=args.iteration,
        plugin=args.plugin,
        merge=args.merge,
        exclude=args.exclude,
        overwrite=args.overwrite,
    )
    what = "merged checkpoint" if args.merge else "adapter"
    say(f"exported {what} {args.megatron_dir} -> {args.peft_dir} in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_import_adapter(args: argparse.Namespace) -> int:
    _note_leftovers(Path(args.megatron_dir))
    start = time.perf_counter()
    bridgecore.import_adapter(
        args.peft_dir, args.megatron_dir, args.base, _layout(args), plugin=args.plugin, overwrite=args.overwrite
    )
    say(
        f"imported adapter {args.peft_dir} -> {args.megatron_dir} ({_layout(args)})"
        f" in {time.perf_counter() - start:.1f}s"
    )
    return 0


def cmd_roundtrip(args: argparse.Namespace) -> int:
    if args.keep:
        bridgecore.check_apart(args.hf_dir, Path(args.keep))
        _note_leftovers(Path(args.keep))
    bridge = _bridge(args)
    report = bridgecore.roundtrip(
        bridge,
        _layout(args),
        keep=args.keep,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        allow_unmapped=args.allow_unmapped,
        say=say,
    )
    if report is None:  # not rank 0
        return 0
    bridgecore.print_report(report, verbose=args.verbose)
    say(f"layout {_layout(args)}; output {'kept in ' + str(args.keep) if args.keep else 'discarded'}")
    return 0 if report.exact else 1


def cmd_verify(args: argparse.Namespace) -> int:
    bridgecore.verify(
        args.hf_dir, _layout(args), plugin=args.plugin, rtol=args.rtol, seq_len=args.seq_len, seed=args.seed, say=say
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return bridgecore.run_demo(Path(args.out) if args.out else None, args.only, overwrite=args.overwrite)


def cmd_new_plugin(args: argparse.Namespace) -> int:
    out = args.out or Path(f"bridgecore-{args.name.replace('_', '-')}")
    for path in bridgecore.write_plugin(args.name, args.architecture, out):
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
    parser.add_argument("--version", action="version", version=f"bridgecore {bridgecore.__version__}")
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
    p.add_argument(
        "--quant",
        help="also quantize (needs bridgecore-quant): fp8 or nvfp4 (ModelOpt, from calibrated amax), or fp8-block"
        " (the FP8 release the model was imported from, its block scales kept)",
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="no model: read each param's chunks and stream it to HF (layout flags unused); one process,"
        " or under torchrun N processes each writing a share",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser(
        "export-adapter",
        help="Megatron LoRA adapter checkpoint -> HF PEFT adapter directory",
        description="Reads the LoRA (or DoRA) adapter weights of a Megatron checkpoint in Megatron-Bridge's"
        " layout (<linear>.adapter.linear_in/linear_out.weight, DoRA's adapter.weight_magnitude; saved at"
        " any TP/PP/EP) and writes"
        " adapter_model.safetensors + adapter_config.json that peft's PeftModel.from_pretrained loads on"
        " the base model. A fused linear's adapter (linear_qkv, gate+up fc1, GDN in_proj) becomes one"
        " adapter per HF module: the shared A and that module's rows of B. No base weight is read.",
    )
    p.add_argument("megatron_dir", type=Path)
    p.add_argument("peft_dir", type=Path, metavar="out_dir")
    p.add_argument("--base", type=Path, required=True, metavar="HF_DIR", help="the base model's HF checkpoint")
    p.add_argument("--plugin", help="use this plugin when several claim the architecture")
    p.add_argument(
        "--alpha",
        type=float,
        help="LoRA alpha, where no adapter.json beside the checkpoint records it (Megatron-Bridge keeps it"
        " in run_config.yaml as peft.alpha); the rank is read off the weights",
    )
    p.add_argument(
        "--iteration", type=int, metavar="N", help="iter_NNNNNNN/ of a training run (default: the tracker's)"
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out the adapters of the Megatron linears matching GLOB (repeatable), e.g. 'mtp.*' for"
        " a consumer whose model has no MTP head (Megatron-Bridge's --exclude-adapter-base-prefix)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="write the base HF checkpoint with the adapter merged into its weights (W + alpha/r * B @ A, in"
        " fp32, cast to W's dtype) instead of a PEFT directory; reads the base weights one at a time",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(fn=cmd_export_adapter)

    p = sub.add_parser(
        "import-adapter",
        help="HF PEFT adapter directory -> Megatron LoRA adapter checkpoint",
        description="Writes the adapter weights alone as a torch_dist checkpoint in Megatron-Bridge's layout,"
        " chunked for the layout given, with adapter.json (each linear's rank and alpha). HF modules fused"
        " in Megatron with different A become one adapter of rank k*r (A stacked, B block-diagonal) whose"
        " delta is exactly theirs. No base weight is read.",
    )
    p.add_argument("peft_dir", type=Path)
    p.add_argument("megatron_dir", type=Path)
    p.add_argument("--base", type=Path, required=True, metavar="HF_DIR", help="the base model's HF checkpoint")
    p.add_argument("--plugin", help="use this plugin when several claim the architecture")
    _layout_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(fn=cmd_import_adapter)

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
        _error(f"{_who()}interrupted (Ctrl-C); the output path was left as it was")
        return 130
    except Terminated:
        _error(f"{_who()}stopped by SIGTERM{_why_stopped()}; the output path was left as it was")
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
    converts = args.command != "plugins"  # every other command converts or builds a model
    try:
        if converts:
            bridgecore.start_run()
        status = args.fn(args)
        if converts:
            bridgecore.end_run()
        return status
    except BaseException:
        # a failed command drops its group too, without the final barrier: the other ranks may be gone
        if converts:
            found = bridgecore.abandon_run()
            if found and not found.startswith(f"rank {_rank()}: "):
                _peer_error.append(found)
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
    if isinstance(exc, bridgecore.BridgeError):
        if args.traceback:
            raise exc
        _error(str(exc))
        return 2
    culprit = None if args.traceback else bridgecore.failing_plugin(exc)
    if culprit is None:  # a bug in the core stays a full traceback
        raise exc
    info, where = culprit
    message = " ".join(str(exc).split())[:300]
    _error(
        f"plugin {info.name} ({info.distribution} {info.version}) failed at {where}:"
        f" {type(exc).__name__}: {message}; rerun with --traceback for details"
    )
    return 2


def _error(text: str) -> None:
    """``bridgecore: error: TEXT`` and its newline in one write: print() writes the newline apart, and
    with unbuffered stderr (PYTHONUNBUFFERED) the ranks' error lines then ran into each other."""
    sys.stderr.write(f"bridgecore: error: {text}\n")
    sys.stderr.flush()
