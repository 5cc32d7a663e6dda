"""The import contracts hold (`.importlinter`, run by import-linter), and the checks behind them can fail.

- `lint-imports` keeps every contract: the core's layers (every import points down; the executors
  independent), the hookspecs apart from the default hooks, the CLI on the public API only, the
  plugins on the public plugin API only;
- the plugins' contract protects every core module but the public ones, so a new module is covered;
- no import cycle among all modules of the core and the plugins, package ``__init__`` modules
  included;
- no module imports another module's private (underscore) name.

Function-level and ``TYPE_CHECKING`` imports count. Each check is also given a case it must reject.
"""

from __future__ import annotations

import ast
import configparser
import importlib
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / ".importlinter"
PUBLIC = {"bridgecore", "bridgecore.plugin", "bridgecore.testing"}


def lint_imports(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on ``config``, with ``cwd`` first on the path (where a test's own package lies).

    Without its cache: grimp's cache (in the working directory) can outlive a checkout that moved
    modules, and then describes the old graph."""
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [command, str(config), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def root_packages() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    return parser["importlinter"]["root_packages"].split()


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of a graph (module -> modules it imports): its strongly connected
    components of more than one module, and modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(start: str) -> None:
        # iterative Tarjan: module graphs are deep enough to exhaust Python's recursion limit
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges.get(node, ()):
                    found.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return found


def private_imports(source: str, first_party: Iterable[str]) -> list[str]:
    """``from <first-party module> import _name`` statements of ``source``, and ``alias._name`` uses of
    first-party modules it imported (dunder names are not private)."""
    parties = tuple(first_party)

    def ours(module: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in parties)

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    tree = ast.parse(source)
    found, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and ours(node.module) and node.level == 0:
            found += [f"from {node.module} import {a.name}" for a in node.names if private(a.name)]
            aliases |= {a.asname or a.name for a in node.names if not private(a.name)}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname or a.name.split(".")[0] for a in node.names if ours(a.name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if private(node.attr):
                found.append(f"{node.value.id}.{node.attr}")
    return found


# -- the contracts hold ---------------------------------------------------------------------------
def test_lint_imports_keeps_every_contract() -> None:
    done = lint_imports(CONFIG, ROOT)
    assert done.returncode == 0 and "0 broken" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]


def test_the_plugins_contract_protects_every_core_module_but_the_public_ones() -> None:
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    protected = set(parser["importlinter:contract:plugins"]["protected_modules"].split())
    graph = grimp.build_graph("bridgecore", include_external_packages=False, cache_dir=None)
    top = {m for m in graph.modules if m.count(".") == 1}
    assert top - PUBLIC - {"bridgecore.__main__"} == protected - {"bridgecore.__main__"}


def test_no_import_cycles_across_core_and_plugins() -> None:
    graph = grimp.build_graph(*root_packages(), include_external_packages=False, cache_dir=None)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert len(edges) > 60  # the core and every plugin were found
    assert cycles(edges) == []


def test_no_module_imports_a_private_name_of_another() -> None:
    parties = root_packages()
    offenders = {}
    for package in parties:
        for file in Path(importlib.import_module(package).__file__).parent.rglob("*.py"):
            found = private_imports(file.read_text(), parties)
            if found:
                offenders[str(file)] = found
    assert offenders == {}


# -- the checks reject what they must ----------------------------------------------------------------
def test_cycles_are_found_through_package_inits_and_self_imports() -> None:
    assert cycles({"p": {"p.a"}, "p.a": {"p"}, "q": set()}) == [["p", "p.a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_private_imports_are_found() -> None:
    source = textwrap.dedent(
        """
        from bridgecore.offline import _SavedChunks, stream_to_hf
        from bridgecore import offline
        import bridgecore.megatron.checkpoint as ck
        from other import _fine
        offline._Region
        ck._state_key(0, [])
        offline.__name__
        """
    )
    assert private_imports(source, ["bridgecore"]) == [
        "from bridgecore.offline import _SavedChunks",
        "offline._Region",
        "ck._state_key",
    ]


@pytest.mark.parametrize(
    ("bad", "contract"),
    [
        ("    from fakecore.plan import Plan  # noqa\n", "layers"),  # a function-level import pointing up
        ("from fakecore.memory import run  # noqa\n", "layers"),  # one executor importing another
    ],
)
def test_lint_imports_breaks_on_an_upward_or_sideways_import(tmp_path: Path, bad: str, contract: str) -> None:
    package = tmp_path / "fakecore"
    package.mkdir()
    for name in ("__init__", "mapping", "plan", "memory"):
        (package / f"{name}.py").write_text("")
    (package / "offline.py").write_text("")
    if bad.startswith("    "):
        (package / "mapping.py").write_text(f"def use() -> None:\n{bad}")
    else:
        (package / "offline.py").write_text(bad)
    config = tmp_path / ".importlinter"
    config.write_text(
        "[importlinter]\nroot_package = fakecore\n\n"
        f"[importlinter:contract:{contract}]\nname = fake layers\ntype = layers\ncontainers = fakecore\n"
        "layers =\n    memory | offline\n    plan\n    mapping\n"
    )
    done = lint_imports(config, tmp_path)
    assert done.returncode != 0 and "BROKEN" in done.stdout, done.stdout[-3000:]
