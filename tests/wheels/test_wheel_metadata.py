"""The distributions as users get them: run by the noxfile's wheel check (`nox -s wheels`), in a venv
where the four plugins were installed by name from the wheelhouse in BRIDGECORE_WHEELHOUSE."""

from __future__ import annotations

import ast
import os
import re
import sys
import tarfile
import tomllib
from importlib.metadata import distribution, entry_points, packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
#: distribution -> its folder in this repository
FOLDERS = {
    "bridgecore": "core",
    "bridgecore-step35": "plugins/step35",
    "bridgecore-step37": "plugins/step37",
    "bridgecore-qwen35": "plugins/qwen35",
    "bridgecore-quant": "plugins/quant",
}

pytestmark = pytest.mark.skipif(
    "BRIDGECORE_WHEELHOUSE" not in os.environ, reason="run by `nox -s wheels` after installing the wheels"
)


def project(name: str) -> dict:
    return tomllib.loads((REPO / FOLDERS[name] / "pyproject.toml").read_text())["project"]


def pins(row: str) -> dict[str, str]:
    """name -> version pinned by one of the noxfile's constraints files."""
    lines = (REPO / "constraints" / row).read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


@pytest.mark.parametrize("name", FOLDERS)
def test_installed_from_the_wheel_not_the_source_tree(name: str) -> None:
    dist = distribution(name)
    assert dist.version == project(name)["version"]
    top = project(name)["name"].replace("-", "_")
    module_file = Path(dist.locate_file(f"{top}/__init__.py"))
    assert module_file.is_file() and "site-packages" in module_file.parts, module_file
    assert REPO / FOLDERS[name] / "src" not in module_file.parents  # not an editable install


@pytest.mark.parametrize("name", FOLDERS)
def test_readme_is_the_long_description(name: str) -> None:
    dist = distribution(name)
    assert dist.metadata["Description-Content-Type"] == "text/markdown"
    body = dist.read_text("METADATA").split("\n\n", 1)[1]
    assert body.strip() == (REPO / FOLDERS[name] / "README.md").read_text().strip()
    assert dist.metadata["Summary"] == project(name)["description"]
    # An index renders the description away from the repository: a relative link there leads nowhere.
    links = re.findall(r"\]\(([^)\s]+)\)", body)
    assert [link for link in links if not re.match(r"https?://|#", link)] == []


@pytest.mark.parametrize("name", FOLDERS)
def test_requires_dist_is_the_pyproject_and_admits_the_tested_pins(name: str) -> None:
    declared = [Requirement(r) for r in distribution(name).requires or []]
    spec = project(name)
    expected = [Requirement(r) for r in spec["dependencies"]]
    for extra, reqs in spec.get("optional-dependencies", {}).items():
        expected += [Requirement(f'{r}; extra == "{extra}"') for r in reqs]
    assert sorted(map(str, declared)) == sorted(map(str, expected))
    # Every range admits what each test row installs (megatron-core 0.16.1 and 0.19.2, torch, transformers).
    for row in ("mcore016.txt", "mcore019.txt"):
        for req in declared:
            pinned = pins(row).get(canonicalize_name(req.name))
            if pinned is not None:
                assert req.specifier.contains(pinned, prereleases=True), f"{name}: {req} excludes {row}'s {pinned}"


def _imported_top_level(name: str) -> set[str]:
    modules: set[str] = set()
    sources = [file for file in distribution(name).files or [] if file.suffix == ".py"]
    assert sources, f"{name}: no Python files installed (an editable install has none to scan)"
    for file in sources:
        for node in ast.walk(ast.parse(Path(file.locate()).read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names)


@pytest.mark.parametrize("name", FOLDERS)
def test_every_import_is_a_declared_dependency(name: str) -> None:
    """Each third-party module the package imports (at module level or inside a function) belongs to a
    distribution its metadata requires (an extra counts: `verify` brings transformers)."""
    declared = {canonicalize_name(Requirement(r).name) for r in distribution(name).requires or []}
    owners = packages_distributions()
    undeclared = {}
    for module in sorted(_imported_top_level(name)):
        dists = {canonicalize_name(d) for d in owners.get(module, [])}
        assert dists, f"{name} imports {module}, which no installed distribution provides"
        if canonicalize_name(name) not in dists and not dists & declared:
            undeclared[module] = sorted(dists)
    assert not undeclared, f"{name} imports modules of distributions it does not declare: {undeclared}"


def test_the_core_declares_what_megatron_cores_writer_needs() -> None:
    """megatron-core's torch_dist writer processes call psutil, which megatron-core does not declare; a
    venv without it left `import` waiting on dead writers, so the core declares it."""
    declared = {canonicalize_name(Requirement(r).name) for r in distribution("bridgecore").requires or []}
    assert "psutil" in declared


def test_entry_points() -> None:
    plugins = {ep.name: (ep.value, canonicalize_name(ep.dist.name)) for ep in entry_points(group="bridgecore")}
    expected = {}
    for name in FOLDERS:
        for ep_name, value in project(name).get("entry-points", {}).get("bridgecore", {}).items():
            expected[ep_name] = (value, canonicalize_name(name))
    assert plugins == expected
    assert set(expected) == {"step35", "step37", "qwen35", "quant"}
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "bridgecore"]
    assert script.value == "bridgecore.cli:main" and script.dist.name == "bridgecore"


@pytest.mark.parametrize("name", FOLDERS)
def test_sdist_holds_what_the_wheel_was_built_from(name: str) -> None:
    wheelhouse = Path(os.environ["BRIDGECORE_WHEELHOUSE"])
    stem = f"{name.replace('-', '_')}-{project(name)['version']}"
    (sdist,) = wheelhouse.glob(f"{stem}.tar.gz")
    assert (wheelhouse / f"{stem}-py3-none-any.whl").is_file()
    with tarfile.open(sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert {"pyproject.toml", "README.md"} <= members
    installed = {str(f) for f in distribution(name).files or [] if f.suffix == ".py"}
    assert installed and {f"src/{f}" for f in installed} <= members, installed - members
