"""Test matrix and the demo, each session in its own virtual environment.

    python3 -m nox -s demo            the main job: every family's tiny model, import -> export -> check
    python3 -m nox -s tests           the default test run (what .ci/run calls)
    python3 -m nox -l                 every session, the megatron-core 0.19 row included

Pins, and why:
- torch==2.13.0 on Python 3.11: the CPU wheel this machine keeps in /opt/wheels (pip's find-links).
  A bare or looser requirement would download the multi-GB CUDA build from PyPI.
- megatron-core==0.16.1: the newest release for Python 3.11 (0.17+ need Python 3.12).
- transformers==5.23.0: the reference forwards (qwen3_5, qwen3_5_moe, step3p7, llama) live there.
- The 0.19 row runs megatron-core==0.19.2 on Python 3.12, where no local CPU torch wheel exists:
  pip downloads torch's CUDA build (it still runs on the CPU). See the cost noted above MCORE_019_FOLDERS.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

PY311 = "3.11"
#: pyenv keeps 3.12 installed but not on PATH on the CI image; BRIDGECORE_PY312 overrides.
PY312 = os.environ.get("BRIDGECORE_PY312") or next(
    (str(p) for p in Path("/root/.pyenv/versions").glob("3.12*/bin/python3.12")), "3.12"
)
TORCH_311 = "torch==2.13.0"
MCORE_016 = "megatron-core==0.16.1"
MCORE_019 = "megatron-core==0.19.2"
TORCH_312 = "torch==2.13.0"
#: Measured on the 2-core machine (empty pip cache): the 0.19 row downloads 2.6 GB of wheels (torch's
#: CUDA build, nvidia-*, triton), installs in about 2.5 minutes into a 5.0 GB venv, and its tests take
#: about 8 minutes. With the default row at about 20-25 minutes that would put the default run over
#: the 30 minutes we allow it, and make every CI run depend on a 2.6 GB download, so it is a separate
#: session (run it before a release, or where a GPU machine has the CUDA wheels cached).
#: It runs every folder of the default run, the reliability and scale tests (about 5 minutes more) included.
MCORE_019_FOLDERS = [
    "tests/core",
    "tests/step35",
    "tests/step37",
    "tests/qwen35",
    "tests/quant",
    "tests/reliability",
    "tests/scale",
]
COMMON = [
    "transformers==5.23.0",
    "safetensors==0.8.0",
    "pluggy==1.6.0",
    "tqdm",
    "numpy",
    "psutil",
    "pytest==9.0.3",
    "hypothesis==6.155.2",
    # tests/core/test_authoring.py builds a scaffolded plugin's wheel without build isolation
    "hatchling==1.33.0",
]

#: plugin -> (local distributions it needs, besides the core, and its test folders)
PLUGINS = {
    "core": ([], ["tests/core"]),
    "step35": (["plugins/step35"], ["tests/step35"]),
    "step37": (["plugins/step35", "plugins/step37"], ["tests/step37"]),
    "qwen35": (["plugins/qwen35"], ["tests/qwen35"]),
    # The quant plugin works for any family: its session installs it with every model plugin.
    "quant": (["plugins/quant", "plugins/step35", "plugins/step37", "plugins/qwen35"], ["tests/quant"]),
    "all": (
        ["plugins/step35", "plugins/step37", "plugins/qwen35", "plugins/quant"],
        ["tests/reliability", "tests/scale", "tests/conformance", "tests/interop"],
    ),
}


def install(session: nox.Session, torch_pin: str, mcore_pin: str, plugins: list[str]) -> None:
    session.install(torch_pin, mcore_pin, *COMMON)
    # The local distributions are installed without re-resolving torch, so the pin above stands.
    session.install("--no-deps", "-e", "core", "-e", "tests/example_plugin", *(x for p in plugins for x in ("-e", p)))


def run_tests(session: nox.Session, folders: list[str]) -> None:
    env = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    # `slow` marks the rest of the multi-rank layout matrix: `nox -s tests -- -m slow` runs it.
    args = session.posargs or ["-m", "not slow"]
    session.run("pytest", "-q", "-p", "no:cacheprovider", *folders, *args, env=env)


@nox.session(python=PY311)
@nox.parametrize("plugin", list(PLUGINS))
def tests(session: nox.Session, plugin: str) -> None:
    """Each plugin installed alone on the core (the "all" row installs every plugin together),
    megatron-core 0.16.1 on Python 3.11."""
    extra, folders = PLUGINS[plugin]
    install(session, TORCH_311, MCORE_016, extra)
    run_tests(session, folders)


@nox.session(python=PY312, name="tests-mcore019")
def tests_mcore019(session: nox.Session) -> None:
    """megatron-core 0.19.2 on Python 3.12 with every plugin installed (not in the default run)."""
    extra, _ = PLUGINS["all"]
    install(session, TORCH_312, MCORE_019, extra)
    run_tests(session, MCORE_019_FOLDERS)


@nox.session(python=PY311)
def demo(session: nox.Session) -> None:
    """The main job: every installed family's tiny model, generate -> import -> export -> compare."""
    extra, _ = PLUGINS["all"]
    install(session, TORCH_311, MCORE_016, extra)
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
    install(session, TORCH_311, MCORE_016, extra)
    session.install("--no-deps", MODELOPT)
    session.install(*MODELOPT_IMPORTS)
    run_tests(session, ["tests/quant/test_modelopt_interop.py"])
