"""Finding and choosing plugins: entry points in the group ``bridgecore``.

``BRIDGECORE_PLUGINS=name,name`` restricts which installed plugins load (by entry-point name or
distribution name). Plugins registered in-process with :meth:`Plugins.register` count too.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pluggy

import bridgecore.hookspecs as hookspecs
from bridgecore.errors import BridgeError

#: families with a first-party plugin, for the install hint (architecture -> distribution).
KNOWN_FAMILIES = {
    "Step3p5ForCausalLM": "bridgecore-step35",
    "Step3p7ForConditionalGeneration": "bridgecore-step37",
    "Qwen3_5ForCausalLM": "bridgecore-qwen35",
    "Qwen3_5MoeForCausalLM": "bridgecore-qwen35",
    "Qwen3_5ForConditionalGeneration": "bridgecore-qwen35",
    "Qwen3_5MoeForConditionalGeneration": "bridgecore-qwen35",
}


def install_hint(distribution: str) -> str:
    """How to get a first-party distribution: they are not on the package index yet, so a bare
    `pip install` would find nothing; the README's "Install" section builds the wheelhouse."""
    return (
        f"pip install --find-links WHEELHOUSE {distribution}, WHEELHOUSE being the wheels built from the"
        ' bridgecore repository (not on PyPI yet; its README, "Install")'
    )


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    module: Any
    architectures: list[str] = field(default_factory=list)

    hooks: list[str] = field(default_factory=list)
    #: hooks the core answers for this plugin (see :mod:`bridgecore.defaults`).
    defaults: list[str] = field(default_factory=list)


class Plugins:
    """The loaded plugins and the pluggy manager that calls them."""

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        #: plugins whose entry point failed to load, with the error: reported, not fatal.
        self.broken: dict[str, str] = {}
        if load_entry_points:
            self._load()

    def _load(self) -> None:
        wanted = {w.strip() for w in os.environ.get("BRIDGECORE_PLUGINS", "").split(",") if w.strip()}
        found = list(entry_points(group=hookspecs.PROJECT))
        known = {ep.name for ep in found} | {ep.dist.name for ep in found if ep.dist}
        if wanted - known:
            raise BridgeError(
                f"BRIDGECORE_PLUGINS names {', '.join(sorted(wanted - known))}, which is not installed;"
                f" installed: {', '.join(sorted(ep.name for ep in found)) or 'none'}"
            )
        for ep in found:
            dist = ep.dist.name if ep.dist else ep.name
            if wanted and ep.name not in wanted and dist not in wanted:
                continue
            try:
                module = ep.load()
            except Exception as exc:  # one broken plugin must not stop conversions the others can do
                self.broken[ep.name] = f"{dist} failed to load: {type(exc).__name__}: {exc}"
                continue
            version = ep.dist.version if ep.dist else "?"
            self.register(module, name=ep.name, distribution=dist, version=version)

    def register(self, module: Any, name: str, distribution: str | None = None, version: str = "?") -> None:
        self.pm.register(module, name=name)
        hooks = sorted(h.name for h in self.pm.get_hookcallers(self.pm.get_plugin(name)) or [])
        info = PluginInfo(name, distribution or name, version, module, hooks=hooks)
        if "architectures" in hooks:
            info.architectures = list(self.call_owned("architectures", info) or [])
        if "transformers_models" in hooks:
            self._register_defaults(info)
        self.infos[name] = info

    def _register_defaults(self, info: PluginInfo) -> None:
        """The core's ``hf_reference`` / ``tiny_models`` for a plugin that names transformers classes
        and does not implement them itself (see :mod:`bridgecore.defaults`); its architectures are claimed."""
        from bridgecore.defaults import default_hooks

        models = list(self.call_owned("transformers_models", info) or [])
        info.architectures += [m.architecture for m in models if m.architecture not in info.architectures]
        defaults = default_hooks(models, set(info.hooks))
        if defaults is not None:
            self.pm.register(defaults, name=_defaults_name(info.name))
            info.defaults = sorted(h.name for h in self.pm.get_hookcallers(defaults) or [])

    def owners(self, architecture: str) -> list[PluginInfo]:
        return [info for info in self.infos.values() if architecture in info.architectures]

    def conflicts(self) -> dict[str, list[PluginInfo]]:
        arches = {a for info in self.infos.values() for a in info.architectures}
        return {a: self.owners(a) for a in sorted(arches) if len(self.owners(a)) > 1}

    def choose(self, hf_config: dict[str, Any], plugin: str | None = None, where: str = "config.json") -> PluginInfo:
        """The one plugin that converts this checkpoint, or a one-line error saying why there is none."""
        arches = hf_config.get("architectures") or []
        arch = arches[0] if arches else hf_config.get("model_type", "<none>")
        if plugin is not None:
            if plugin not in self.infos:
                raise BridgeError(f"--plugin {plugin}: not installed; installed: {self.summary()}")
            return self.infos[plugin]
        owners = self.owners(arch)
        if len(owners) > 1:
            names = " and ".join(f"{o.name} ({o.distribution})" for o in owners)
            raise BridgeError(f"{where}: architecture {arch} is claimed by {names}; pick one with --plugin NAME")
        if not owners:
            hint = KNOWN_FAMILIES.get(arch)
            tip = f"; {install_hint(hint)}" if hint else ""
            raise BridgeError(
                f"{where}: no installed plugin claims architecture {arch}; installed: {self.summary()}{tip}"
            )
        return owners[0]

    def summary(self) -> str:
        parts = [f"{i.name} ({', '.join(i.architectures) or 'no architectures'})" for i in self.infos.values()]
        parts += [f"{name} (broken: {error})" for name, error in self.broken.items()]
        return ", ".join(parts) or "none"

    def call_owned(self, hook: str, owner: PluginInfo, **kwargs: Any) -> Any:
        """Call a firstresult hook on the owning plugin alone, through pluggy's registered impl."""
        impls = [
            i
            for i in getattr(self.pm.hook, hook).get_hookimpls()
            if i.plugin_name in (owner.name, _defaults_name(owner.name))
        ]
        if not impls:
            raise BridgeError(f"plugin {owner.name} does not implement the {hook} hook")
        impl = impls[0]
        return impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})

    def call_all(self, hook: str, **kwargs: Any) -> list[Any]:
        return getattr(self.pm.hook, hook)(**kwargs)


def _defaults_name(plugin: str) -> str:
    """The pluggy name of the core's default hooks for ``plugin``."""
    return f"{plugin}:defaults"


@cache
def installed() -> Plugins:
    """The plugins installed in this environment (loaded once per process)."""
    return Plugins()


def failing_plugin(exc: BaseException) -> tuple[PluginInfo, str] | None:
    """The installed plugin whose code raised ``exc`` (the innermost plugin frame), and file:line, or None."""
    infos = installed().infos.values()
    packages = {getattr(i.module, "__name__", type(i.module).__module__).split(".")[0]: i for i in infos}
    found = None
    for frame, line in traceback.walk_tb(exc.__traceback__):
        package = str(frame.f_globals.get("__name__", "")).split(".")[0]
        if package in packages:
            found = (packages[package], f"{Path(frame.f_code.co_filename).name}:{line}")
    return found
