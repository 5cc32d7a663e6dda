"""bridgecore: exact, streaming checkpoint conversion between Hugging Face and Megatron-Core.

The public Python API. Every name is imported from its module on first use, so ``import bridgecore``
(and ``bridgecore plugins``, ``--help``) loads neither torch nor megatron-core:

- the in-memory bridge :class:`AutoBridge` and the parallel :class:`Layout`;
- one function per command: :func:`import_checkpoint`, :func:`export_checkpoint`, :func:`roundtrip`,
  :func:`verify`, :func:`inspect`, with :func:`open_hf` to make a bridge;
- LoRA adapters: :func:`export_adapter` (Megatron -> PEFT), :func:`import_adapter` (PEFT -> Megatron);
- weight streaming: :func:`export_hf_weights`, :class:`WeightBucket`, :func:`buckets`;
- the checks: :func:`compare_checkpoints`; the one error type :class:`BridgeError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridgecore.lazy import lazy_exports
from bridgecore.version import __version__

if TYPE_CHECKING:
    from bridgecore.api import (
        Inspection,
        check_apart,
        export_adapter,
        export_checkpoint,
        hf_checkpoint,
        import_adapter,
        import_checkpoint,
        inspect,
        leftovers_note,
        open_hf,
        roundtrip,
        verify,
        waived_report,
    )
    from bridgecore.compare import LogitsParity, Report, compare_checkpoints, print_report
    from bridgecore.demo import run_demo
    from bridgecore.errors import BridgeError
    from bridgecore.megatron.parallel import Layout
    from bridgecore.memory import AutoBridge
    from bridgecore.plugins import PluginInfo, Plugins, failing_plugin, install_hint, installed
    from bridgecore.runs import abandon_run, end_run, start_run
    from bridgecore.scaffold import write_plugin
    from bridgecore.streaming import export_hf_weights
    from bridgecore.weights import WeightBucket, buckets

_MODULES = {
    "bridgecore.api": (
        "Inspection",
        "check_apart",
        "export_adapter",
        "export_checkpoint",
        "hf_checkpoint",
        "import_adapter",
        "import_checkpoint",
        "inspect",
        "leftovers_note",
        "open_hf",
        "roundtrip",
        "verify",
        "waived_report",
    ),
    "bridgecore.compare": ("LogitsParity", "Report", "compare_checkpoints", "print_report"),
    "bridgecore.demo": ("run_demo",),
    "bridgecore.errors": ("BridgeError",),
    "bridgecore.megatron.parallel": ("Layout",),
    "bridgecore.memory": ("AutoBridge",),
    "bridgecore.plugins": ("PluginInfo", "Plugins", "failing_plugin", "install_hint", "installed"),
    "bridgecore.runs": ("abandon_run", "end_run", "start_run"),
    "bridgecore.scaffold": ("write_plugin",),
    "bridgecore.streaming": ("export_hf_weights",),
    "bridgecore.weights": ("WeightBucket", "buckets"),
}

__all__ = [
    "__version__",
    "abandon_run",
    "AutoBridge",
    "BridgeError",
    "buckets",
    "check_apart",
    "compare_checkpoints",
    "end_run",
    "export_adapter",
    "export_checkpoint",
    "export_hf_weights",
    "failing_plugin",
    "hf_checkpoint",
    "import_adapter",
    "import_checkpoint",
    "inspect",
    "Inspection",
    "install_hint",
    "installed",
    "Layout",
    "leftovers_note",
    "LogitsParity",
    "open_hf",
    "PluginInfo",
    "Plugins",
    "print_report",
    "Report",
    "roundtrip",
    "run_demo",
    "start_run",
    "verify",
    "waived_report",
    "WeightBucket",
    "write_plugin",
]

__getattr__ = lazy_exports(__name__, _MODULES)
