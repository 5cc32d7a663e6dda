# /// script
# dependencies = ["nox==2026.10.20", "uv==0.13.9"]
# ///
"""Test matrix and the demo, each session in its own virtual environment.

    python3 -m nox -s demo            the main job: every family's tiny model, import -> export -> check
    python3 -m nox -s tests           the default test run (what .ci/run calls), the wheel check included
    python3 -m nox -s wheels          the wheel check alone: build, install by name, run, check metadata
    python3 -m nox -s mutants         mutation testing: kill rate per module, its floor, the survivors
    python3 -m nox -l                 every session, the megatron-core 0.19 row included

How the sessions install:
- Our distributions are installed with their declared dependencies, resolved by the installer, so a
  dependency missing from a pyproject fails here as it would for a user. Only the test tools
  (TEST_TOOLS) are listed by hand. constraints/*.txt pin torch (the CPU wheel stands), and per row
  megatron-core and transformers (the [verify] extras' reference forwards).
- The installer is uv (the script block above: `python3 -m nox` installs nox and uv into
  .nox/_nox_script_mode once and runs itself there). It keeps one wheel cache for every session and
  links from it, where pip unpacked torch, megatron-core and transformers into each venv again.
  uv reads no pip configuration, so pip's configured find-links (where this machine keeps the CPU
  torch wheel) are handed to it (pip_find_links).
- Measured on the 2-core machine with other jobs running (load average 13-15): one session's
  third-party set (torch, megatron-core, transformers, pytest, hypothesis: 45 wheels) took pip 11 min
  23 s into a fresh venv from wheels already on disk (no network), and took uv 61 s with an empty
  cache (downloads included) and 6.6 s with a warm one.
- Each plugin's session still has its own venv with only that plugin (and what it declares) on the
  core, so per-plugin isolation is kept; venvs are made anew each run, so nothing stale hides a
  dropped dependency.

Pins, and why:
- torch==2.13.0 on Python 3.11: the CPU wheel this machine keeps in pip's find-links (/opt/wheels).
  A bare or looser requirement would download the multi-GB CUDA build from PyPI.
- megatron-core==0.16.1: the newest release for Python 3.11 (0.17+ need Python 3.12). Every
  distribution declares megatron-core>=0.16.1,<0.20 because both rows (0.16.1 and 0.19.2) pass.
- transformers==5.23.0: the reference forwards (qwen3_5, qwen3_5_moe, step3p7, llama) live there.
- The 0.19 row runs megatron-core==0.19.2 on Python 3.12, where no local CPU torch wheel exists:
  the CUDA build is downloaded (it still runs on the CPU). See the cost noted above MCORE_019_FOLDERS.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "uv"
# uv installs without compiling bytecode, and where PYTHONDONTWRITEBYTECODE is set (this machine and
# CI set it) no process writes any later: every `bridgecore` a test starts then compiled torch,
# megatron-core and transformers afresh, about 7 s more per process (an import of megatron-core's GPT
# model took 16 s instead of 9 s), which doubled the core and "all" rows. Compiled at install instead
# (about 8 s for torch).
os.environ.setdefault("UV_COMPILE_BYTECODE", "1")

PY311 = "3.11"
#: pyenv keeps 3.12 installed but not on PATH on the CI image; BRIDGECORE_PY312 overrides.
PY312 = os.environ.get("BRIDGECORE_PY312") or next(
    (str(p) for p in Path("/root/.pyenv/versions").glob("3.12*/bin/python3.12")), "3.12"
)
ROW_016 = "constraints/mcore016.txt"
ROW_019 = "constraints/mcore019.txt"
#: The wheel check pins torch alone, as the README's install section does.
TORCH_ONLY = "constraints/torch.txt"
#: Measured on the 2-core machine (empty pip cache): the 0.19 row downloads 2.6 GB of wheels (torch's
#: CUDA build, nvidia-*, triton), installs in about 2.5 minutes into a 5.0 GB venv, and its tests take
#: about 32 minutes (every folder: conformance and interop included). With the default row at about 26
#: minutes that would double the default run, and make every CI run depend on a 2.6 GB download, so it is a separate
#: session (run it before a release, or where a GPU machine has the CUDA wheels cached).
#: It runs every folder of the default run but the wheel check.
MCORE_019_FOLDERS = [
    "tests/core",
    "tests/step35",
    "tests/step37",
    "tests/qwen35",
    "tests/quant",
    "tests/reliability",
    "tests/scale",
    "tests/conformance",
    "tests/interop",
    "tests/adapters",
]
#: The test tools: the only hand-written list. Everything else comes from our distributions' metadata.
TEST_TOOLS = [
    "pytest==9.0.3",
    "hypothesis==6.155.2",
    # tests/core/test_authoring.py builds a scaffolded plugin's wheel without build isolation, with pip
    # (a venv made by uv has none)
    "hatchling==1.33.0",
    "pip==26.3",
    # tests/imports: the import contracts of .importlinter (grimp comes with it)
    "import-linter==2.17",
    # tests/adapters: LoRA adapters made and loaded by peft itself (the newest release; it brings accelerate)
    "peft==0.21.2",
    # tests/quant: compressed-tensors FP8 checkpoints made and decompressed by the library itself (the
    # newest release; it adds only loguru to the rest of the set)
    "compressed-tensors==0.20.1",
]

#: plugin -> (local distributions it needs, besides the core, and its test folders). Each is installed
#: with its [verify] extra: the tests compare against the transformers reference forwards.
PLUGINS = {
    "core": ([], ["tests/core"]),
    "step35": (["plugins/step35"], ["tests/step35"]),
    "step37": (["plugins/step35", "plugins/step37"], ["tests/step37"]),
    "qwen35": (["plugins/qwen35"], ["tests/qwen35"]),
    # The quant plugin works for any family: its session installs it with every model plugin.
    "quant": (["plugins/quant", "plugins/step35", "plugins/step37", "plugins/qwen35"], ["tests/quant"]),
    "all": (
        ["plugins/step35", "plugins/step37", "plugins/qwen35", "plugins/quant"],
        [
            # the import contracts need every plugin installed
            "tests/imports",
            "tests/reliability",
            "tests/scale",
            "tests/conformance",
            "tests/interop",
            # LoRA adapters of every family (peft's own adapters, Megatron's from megatron-core's save)
            "tests/adapters",
            # the layout checks of the plugins' own tiny models: skipped in the core row, which has none
            "tests/core/test_layout_check.py::test_layout_check_names_the_value_and_what_it_must_divide",
            "tests/core/test_layout_check.py::test_offline_import_checks_expert_parallelism",
        ],
    ),
}
#: What the wheel check builds (core and each plugin) and installs by name (the four plugins).
DISTRIBUTIONS = ["core", "plugins/step35", "plugins/step37", "plugins/qwen35", "plugins/quant"]
#: The plugins' names, as their folders under plugins/ and their packages' suffix (bridgecore_<name>).
PLUGIN_NAMES = tuple(Path(d).name for d in DISTRIBUTIONS if d != "core")
USER_INSTALL = ["bridgecore-step35", "bridgecore-step37", "bridgecore-qwen35", "bridgecore-quant"]


def pip_find_links() -> list[str]:
    """uv's --find-links arguments for the find-links pip is configured with (environment or pip.conf).

    uv reads no pip configuration; this machine keeps its CPU torch wheel in pip's find-links.
    """
    try:
        listing = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    links: list[str] = []
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".find-links"):
            links += value.strip().strip("'\"").split()
    return [arg for link in dict.fromkeys(links) for arg in ("--find-links", link)]


FIND_LINKS = pip_find_links()


def install(session: nox.Session, constraints: str, plugins: list[str]) -> None:
    """The core, the example plugin and ``plugins`` (editable, the plugins with their [verify] extras,
    each with every dependency it declares), then the test tools."""
    local = ["core", "tests/example_plugin", *(f"{p}[verify]" for p in plugins)]
    session.install(*FIND_LINKS, "-c", constraints, *(x for p in local for x in ("-e", f"./{p}")), *TEST_TOOLS)


def run_tests(session: nox.Session, folders: list[str]) -> None:
    # A rank that fails inside one of megatron-core's collectives leaves its peers waiting until
    # BRIDGECORE_TIMEOUT (default 1800 s): tests wait 300 s at most, so such a bug fails, never stalls, CI.
    env = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "BRIDGECORE_TIMEOUT": "300"}
    # `slow` marks the rest of the multi-rank layout matrix: `nox -s tests -- -m slow` runs it.
    args = session.posargs or ["-m", "not slow"]
    session.run("pytest", "-q", "-p", "no:cacheprovider", *folders, *args, env=env)


def check_wheels(session: nox.Session) -> None:
    """Build the wheel and sdist of every distribution, install the four plugins by name from that
    wheelhouse into this fresh venv as `pip install bridgecore-step35 ...` would (the core comes in as
    their dependency; only torch pinned), run the commands a user runs first, then check the metadata
    (tests/wheels, twine check)."""
    tmp = Path(session.create_tmp())
    wheelhouse, demo_out = tmp / "wheelhouse", tmp / "demo"
    for stale in (wheelhouse, demo_out):
        shutil.rmtree(stale, ignore_errors=True)
    for dist in DISTRIBUTIONS:
        # A directory builds its sdist first and the wheel from that sdist, so the sdist is complete.
        session.run("uv", "build", "--quiet", "--out-dir", str(wheelhouse), dist)
    # uv caches a find-links wheel by name and version: refresh ours, or a rebuild of 0.1.0 installs the
    # first 0.1.0 it ever cached.
    refresh = [arg for name in ("bridgecore", *USER_INSTALL) for arg in ("--refresh-package", name)]
    session.install(*FIND_LINKS, "--find-links", str(wheelhouse), *refresh, "-c", TORCH_ONLY, *USER_INSTALL)
    env = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    # Bounded: a writer process that dies must fail this session, never hang it.
    bounded = ["timeout", "--kill-after=30", "900"]
    session.run(*bounded, "bridgecore", "plugins", env=env, external=True)
    session.run(*bounded, "bridgecore", "demo", "--out", str(demo_out), env=env, external=True)
    session.run(*bounded, "bridgecore", "roundtrip", str(demo_out / "step37" / "hf"), env=env, external=True)
    # Then the metadata, with the test tools (and the [verify] extras, so every import resolves).
    verify = [f"{name}[verify]" for name in USER_INSTALL if name != "bridgecore-quant"]
    session.install(*FIND_LINKS, "--find-links", str(wheelhouse), "-c", ROW_016, *verify, *TEST_TOOLS, "twine==7.0.0")
    # (uv build also leaves a .gitignore there.)
    built = sorted(str(p) for pattern in ("*.whl", "*.tar.gz") for p in wheelhouse.glob(pattern))
    session.run("twine", "check", "--strict", *built)
    session.run(
        "pytest", "-q", "-p", "no:cacheprovider", "tests/wheels", env={**env, "BRIDGECORE_WHEELHOUSE": str(wheelhouse)}
    )


@nox.session(python=PY311)
@nox.parametrize("plugin", [*PLUGINS, nox.param("wheels", id="wheels")])
def tests(session: nox.Session, plugin: str) -> None:
    """Each plugin installed alone on the core (the "all" row installs every plugin together),
    megatron-core 0.16.1 on Python 3.11; and `tests(wheels)`, the wheel check."""
    if plugin == "wheels":
        check_wheels(session)
        return
    extra, folders = PLUGINS[plugin]
    install(session, ROW_016, extra)
    run_tests(session, folders)


@nox.session(python=PY311)
def wheels(session: nox.Session) -> None:
    """The wheel check alone (the default run has it as `tests(wheels)`)."""
    check_wheels(session)


@nox.session(python=PY312, name="tests-mcore019")
def tests_mcore019(session: nox.Session) -> None:
    """megatron-core 0.19.2 on Python 3.12 with every plugin installed (not in the default run)."""
    extra, _ = PLUGINS["all"]
    install(session, ROW_019, extra)
    run_tests(session, MCORE_019_FOLDERS)


@nox.session(python=PY311)
def demo(session: nox.Session) -> None:
    """The main job: every installed family's tiny model, generate -> import -> export -> compare."""
    extra, _ = PLUGINS["all"]
    install(session, ROW_016, extra)
    session.run("bridgecore", "plugins")
    session.run("bridgecore", "demo", *session.posargs, env={"OMP_NUM_THREADS": "1"})


#: ModelOpt's declared requirements would let pip pick a CUDA torch and a large tree it does not use
#: here; it installs without them, plus the pure-Python packages its quantization and HF export
#: import (found by importing `modelopt.torch.quantization` and `modelopt.torch.export` on the
#: default row: requests, urllib3, certifi, omegaconf, PuLP, scipy; pydantic and rich come too).
MODELOPT = "nvidia-modelopt==0.47.0"
MODELOPT_IMPORTS = ["pydantic>=2", "rich", "omegaconf>=2.3", "PuLP<4", "scipy", "requests"]


@nox.session(python=PY311, name="tests-modelopt")
def tests_modelopt(session: nox.Session) -> None:
    """The quant plugin against NVIDIA ModelOpt itself (calibrate, import, export, compare); not in the
    default run: importing ModelOpt alone takes about a minute on 2 cores, the run several."""
    extra, _ = PLUGINS["quant"]
    install(session, ROW_016, extra)
    session.install(*FIND_LINKS, "-c", ROW_016, "--no-deps", MODELOPT)
    session.install(*FIND_LINKS, "-c", ROW_016, *MODELOPT_IMPORTS)
    run_tests(session, ["tests/quant/test_modelopt_interop.py"])


@nox.session(python=PY311)
def bench(session: nox.Session) -> None:
    """The conversion benchmarks (bench/README.md): `python3 -m nox -s bench -- --sizes 1 4 --work DIR`."""
    # bench_startup.py inspects the full-size Step-3.5-Flash layout: the step35 plugin too.
    local = ["./core", "./tests/example_plugin", "./plugins/step35"]
    session.install(*FIND_LINKS, "-c", ROW_016, *local, "psutil", "matplotlib==3.10.3")
    session.run("python", "bench/bench_convert.py", *session.posargs, env={"OMP_NUM_THREADS": "1"})


#: `nox -s mutants`: mutation testing with mutmut (pinned: its mutant names, which tests/mutants.toml
#: lists, change between releases). What it mutates: the mapping engine, the checkpoint comparison,
#: the HF writer, the quant formats and the plugins' mappings. Each distribution's package is copied
#: side by side into one src/ folder, the layout mutmut imports from.
MUTMUT = "mutmut==3.8.1"
MUTATED = [
    "src/bridgecore/mapping/*",
    "src/bridgecore/compare.py",
    "src/bridgecore/hf/writer.py",
    "src/bridgecore_quant/formats.py",
    "src/bridgecore_step35/mappings.py",
    "src/bridgecore_step37/mappings.py",
    "src/bridgecore_qwen35/mappings.py",
]
#: The in-process tests of those modules. mutmut runs, for each mutant, the tests that called the
#: function it changed; tests that convert in child processes cannot see a mutant, and are left out.
MUTANT_TESTS = [
    "tests/core/test_mapping_layouts.py",
    "tests/core/test_mapping_properties.py",
    "tests/core/test_mapping_errors.py",
    "tests/core/test_mapping_table.py",
    "tests/core/test_lora_mappings.py",
    "tests/core/test_verifiers_reject.py",
    "tests/core/test_hf_writer.py",
    "tests/core/test_mtp.py",
    "tests/quant/test_formats.py",
    "tests/quant/test_format_refusals.py",
    "tests/quant/test_format_spec.py",
    "tests/quant/test_amax_mappings.py",
    "tests/quant/test_fused_experts.py",
    "tests/quant/test_recalibrated.py::test_in_memory_export_of_a_recalibrated_model",
    "tests/step35/test_step35_mappings.py",
    "tests/step37/test_step37_mappings.py",
    "tests/qwen35/test_qwen35_mappings.py",
]
#: In process but slow under mutmut's call tracing (49 s where it takes 12 s): it would run for every
#: mutant the quick tests let through.
MUTANT_DESELECT = [
    "--deselect",
    "tests/step35/test_step35_mappings.py::test_released_model_exports_the_released_layout",
]
#: The floor: every module keeps at least this share of its mutants killed (equivalents left out).
KILL_FLOOR = 0.90


def mutmut_config() -> str:
    listed = json.dumps  # a JSON list of plain strings is a TOML array
    return "\n".join(
        [
            "[tool.mutmut]",
            'source_paths = ["src"]',
            f"only_mutate = {listed(MUTATED)}",
            f"pytest_add_cli_args_test_selection = {listed(MUTANT_TESTS)}",
            f"pytest_add_cli_args = {listed(['-p', 'no:cacheprovider', '-m', 'not slow', *MUTANT_DESELECT])}",
            # torch is not fork-safe once it has run: each mutant forks from a server that never ran a test
            'process_isolation = "forkserver"',
            "",
        ]
    )


KILLED = ("killed", "timeout", "segfault")


def mutant_states(results: str) -> dict[str, str]:
    """mutant -> its state, from `mutmut results --all true`."""
    states = {}
    for line in results.splitlines():
        name, sep, state = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            states[name] = state
    return states


def kill_rates(status: dict[str, str], equivalent: dict[str, str]) -> tuple[list[str], list[str]]:
    """The table of kill rates per module, and what fails the session: modules under the floor, and
    listed equivalents that a test kills or that mutmut no longer makes (their function changed)."""
    per_module: dict[str, list[int]] = {}
    survivors, killed_equivalents = [], []
    for name, state in sorted(status.items()):
        # bridgecore.mapping.types.xǁFusedQKVǁhf_sizes__mutmut_3: module, then x + class and function
        module = re.sub(r"\.x[_ǁ].*", "", name)
        counts = per_module.setdefault(module, [0, 0, 0])  # killed, counted, equivalent
        if name in equivalent:
            counts[2] += 1
            if state in KILLED:
                killed_equivalents.append(name)
            continue
        counts[1] += 1
        # a mutant that hangs a test or crashes the interpreter was seen as well as one that fails it
        if state in KILLED:
            counts[0] += 1
        else:
            survivors.append(f"  {name}: {state}")
    table, failures = [], []
    for module, (killed, counted, same) in sorted(per_module.items()):
        rate = killed / counted if counted else 1.0
        table.append(f"  {module:<40} {killed:>5}/{counted:<5} {rate:7.1%}  ({same} equivalent)")
        if rate < KILL_FLOOR:
            failures.append(f"{module}: {rate:.1%} of its mutants killed, under the {KILL_FLOOR:.0%} floor")
    failures += [f"tests/mutants.toml lists {name} as equivalent, but a test kills it" for name in killed_equivalents]
    stale = sorted(equivalent.keys() - status)
    failures += [f"tests/mutants.toml lists {name}, which mutmut no longer makes" for name in stale]
    return table + (["survivors:", *survivors] if survivors else []), failures


@nox.session(python=PY311)
def mutants(session: nox.Session) -> None:
    """Mutation testing (not in the default run; about an hour on 2 cores): the kill rate per module,
    the survivors, and a failure where a module is under KILL_FLOOR. tests/mutants.toml lists the
    equivalent mutants, each with a reason.

    `-- --again` tests the last run's survivors again, for tests added since on the same code, and
    counts the rest as the last run left them (a mutant a test killed stays killed when tests are only
    added or made stricter). `-- NAME...` runs those mutants (mutmut's glob patterns) alone."""
    import tomllib

    again = session.posargs == ["--again"]
    # Installed, not editable: the tests import the mutated copies, which come first on sys.path.
    local = ["./core", "./tests/example_plugin", *(f"./plugins/{p}[verify]" for p in PLUGIN_NAMES)]
    session.install(*FIND_LINKS, "-c", ROW_016, *local, *TEST_TOOLS, MUTMUT)
    work = Path(session.create_tmp()) / "mutmut"
    if not session.posargs:
        shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(parents=True, exist_ok=True)
    for package in ["core/src/bridgecore", *(f"plugins/{p}/src/bridgecore_{p}" for p in PLUGIN_NAMES)]:
        shutil.copytree(package, work / "src" / Path(package).name, dirs_exist_ok=True)
    shutil.copytree("tests", work / "tests", dirs_exist_ok=True)
    (work / "pyproject.toml").write_text(mutmut_config())
    equivalent = tomllib.loads(Path("tests/mutants.toml").read_text())["equivalent"]
    env = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "HYPOTHESIS_PROFILE": "mutants"}
    with session.chdir(work):
        if again:
            last = mutant_states(session.run("mutmut", "results", "--all", "true", env=env, silent=True) or "")
            session.run("mutmut", "run", *(name for name, state in last.items() if state not in KILLED), env=env)
        else:
            session.run("mutmut", "run", *session.posargs, env=env)
        now = mutant_states(session.run("mutmut", "results", "--all", "true", env=env, silent=True) or "")
    status = {**last, **{name: state for name, state in now.items() if state != "not checked"}} if again else now
    table, failures = kill_rates(status, equivalent)
    print("\n".join(["killed/counted per module:", *table]))
    if failures:
        session.error("; ".join(failures))
