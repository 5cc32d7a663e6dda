"""The plugin manager: who claims a checkpoint, and the one-line errors when nobody or two do."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bridgecore import plugins as plugin_module
from bridgecore.errors import BridgeError
from bridgecore.hookspecs import hookimpl
from bridgecore.plugins import Plugins


def fake_plugin(*arches: str) -> SimpleNamespace:
    return SimpleNamespace(architectures=hookimpl(lambda: list(arches)))


def manager(**named: SimpleNamespace) -> Plugins:
    pm = Plugins(load_entry_points=False)
    for name, module in named.items():
        pm.register(module, name=name, distribution=f"dist-{name}", version="1.0")
    return pm


def test_the_claiming_plugin_is_chosen() -> None:
    pm = manager(a=fake_plugin("FooForCausalLM"), b=fake_plugin("BarForCausalLM"))
    assert pm.choose({"architectures": ["BarForCausalLM"]}).name == "b"


def test_unclaimed_checkpoint_names_architecture_installed_plugins_and_hint() -> None:
    pm = manager(a=fake_plugin("FooForCausalLM"))
    with pytest.raises(BridgeError) as err:
        pm.choose({"architectures": ["Step3p5ForCausalLM"]}, where="ckpt/config.json")
    message = str(err.value)
    assert "\n" not in message
    assert "ckpt/config.json" in message and "Step3p5ForCausalLM" in message
    assert "a (FooForCausalLM)" in message and "pip install --find-links WHEELHOUSE bridgecore-step35" in message


def test_unknown_family_has_no_install_hint() -> None:
    with pytest.raises(BridgeError) as err:
        manager().choose({"architectures": ["MysteryLM"]})
    assert "installed: none" in str(err.value) and "pip install" not in str(err.value)


def test_conflict_names_both_distributions_and_plugin_flag_resolves_it() -> None:
    pm = manager(a=fake_plugin("FooForCausalLM"), b=fake_plugin("FooForCausalLM"))
    with pytest.raises(BridgeError, match=r"claimed by a \(dist-a\) and b \(dist-b\).*--plugin"):
        pm.choose({"architectures": ["FooForCausalLM"]})
    assert pm.choose({"architectures": ["FooForCausalLM"]}, plugin="b").name == "b"
    assert list(pm.conflicts()) == ["FooForCausalLM"]


def test_environment_restricts_and_broken_plugins_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken():
        raise ImportError("no module named missing_dep")

    entries = [
        SimpleNamespace(
            name="good", dist=SimpleNamespace(name="dist-good", version="2.0"), load=lambda: fake_plugin("G")
        ),
        SimpleNamespace(name="bad", dist=SimpleNamespace(name="dist-bad", version="0.1"), load=broken),
        SimpleNamespace(
            name="other", dist=SimpleNamespace(name="dist-other", version="1.0"), load=lambda: fake_plugin("O")
        ),
    ]
    monkeypatch.setattr(plugin_module, "entry_points", lambda group: entries)
    monkeypatch.setenv("BRIDGECORE_PLUGINS", "good,bad")
    pm = Plugins()
    assert list(pm.infos) == ["good"] and pm.infos["good"].version == "2.0"
    assert "missing_dep" in pm.broken["bad"]
    assert "bad (broken" in pm.summary()
