"""``bridgecore new-plugin NAME --architecture ARCH``: a working plugin distribution to start from.

It writes a distribution that installs, loads and converts a Llama-style decoder of transformers'
class ``ARCH`` as it stands; the author then adapts two functions, ``provider_config`` (config.json
-> megatron-core config) and ``mappings`` (HF tensors <-> Megatron params), to what the family
adds (``bridgecore inspect`` on its tiny model shows what is left unmapped). The tiny model and the
``verify`` reference come from the core (``transformers_models``), the tests from
:mod:`bridgecore.testing`.
"""

from __future__ import annotations

import re
from pathlib import Path

from bridgecore.defaults import transformers_class
from bridgecore.errors import BridgeError
from bridgecore.version import __version__

_NAME = re.compile(r"[a-z][a-z0-9_]*")

_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{dist}"
version = "0.1.0"
description = "bridgecore plugin for {arch} checkpoints"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["bridgecore>={core}", "transformers"]

[project.entry-points.bridgecore]
{name} = "{module}"

[tool.hatch.build.targets.wheel]
packages = ["src/{module}"]

[tool.pytest.ini_options]
markers = ["slow: every parallel layout (several processes per tiny model)"]
addopts = "-m 'not slow'"
"""

_MODULE = '''\
"""bridgecore plugin for {arch} checkpoints.

A plugin is its config translation (``provider_config``) and its mappings (``mappings``); naming
transformers' class (``transformers_models``) claims the architecture and gets the core's tiny
model and ``verify`` reference. Both functions start as a Llama-style decoder: adapt them to what
{arch} adds, guided by ``bridgecore inspect`` on the tiny model.
"""

from __future__ import annotations

from typing import Any

import torch

from bridgecore.plugin import (
    BridgeError,
    ColumnParallel,
    FusedQKV,
    GatedMLP,
    Mapping,
    ModelConfig,
    Replicated,
    RowParallel,
    TransformersModel,
    hookimpl,
)

_DTYPES = {{"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}}

#: the tiny model's config, in the keys of transformers' {config_class}.
TINY_CONFIG = {{
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
}}


@hookimpl
def transformers_models() -> list[TransformersModel]:
    return [TransformersModel("{arch}", TINY_CONFIG, "{name}-tiny", "tiny {arch} made by transformers")]


def _require(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg:
        raise BridgeError(f"config.json: key {{key!r}} is missing; {arch} needs it")
    return cfg[key]


@hookimpl
def provider_config(hf_config: dict[str, Any]) -> ModelConfig:
    heads, hidden = _require(hf_config, "num_attention_heads"), _require(hf_config, "hidden_size")
    rope = hf_config.get("rope_parameters") or {{}}
    dtype_name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if dtype_name not in _DTYPES:
        raise BridgeError(f"config.json: dtype {{dtype_name!r}} is not one of {{sorted(_DTYPES)}}")
    dtype = _DTYPES[dtype_name]
    return ModelConfig(
        num_layers=_require(hf_config, "num_hidden_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads", heads),
        kv_channels=hf_config.get("head_dim") or hidden // heads,
        ffn_hidden_size=_require(hf_config, "intermediate_size"),
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        vocab_size=_require(hf_config, "vocab_size"),
        max_sequence_length=hf_config.get("max_position_embeddings", 4096),
        rotary_base=rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)),
        share_embeddings_and_output_weights=bool(hf_config.get("tie_word_embeddings", False)),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
    )


@hookimpl
def layer_spec(config: ModelConfig, vp_stage: int | None) -> Any:
    from bridgecore.plugin import gpt_block_spec  # megatron-core loads only when a model is built

    return gpt_block_spec(config, vp_stage)


@hookimpl
def mappings(config: ModelConfig) -> list[Mapping]:
    layer, hf_layer = "decoder.layers.{{layer}}.", "model.layers.{{layer}}."
    table: list[Mapping] = [
        ColumnParallel("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        Replicated("decoder.final_layernorm.weight", "model.norm.weight"),
        Replicated(layer + "input_layernorm.weight", hf_layer + "input_layernorm.weight"),
        FusedQKV(
            layer + "self_attention.linear_qkv.weight",
            *(hf_layer + f"self_attn.{{p}}_proj.weight" for p in "qkv"),
            heads=config.num_attention_heads,
            groups=config.num_query_groups,
            head_dim=config.kv_channels,
        ),
        RowParallel(layer + "self_attention.linear_proj.weight", hf_layer + "self_attn.o_proj.weight"),
        Replicated(layer + "pre_mlp_layernorm.weight", hf_layer + "post_attention_layernorm.weight"),
        GatedMLP(layer + "mlp.linear_fc1.weight", hf_layer + "mlp.gate_proj.weight", hf_layer + "mlp.up_proj.weight"),
        RowParallel(layer + "mlp.linear_fc2.weight", hf_layer + "mlp.down_proj.weight"),
    ]
    if not config.share_embeddings_and_output_weights:
        table.append(ColumnParallel("output_layer.weight", "lm_head.weight"))
    return table
'''

_TESTS = '''\
"""The {name} plugin's conformance: bridgecore's standard checks on its tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridgecore.testing import ALL_LAYOUTS, check_tiny_model, tiny_model_names

PLUGIN = "{name}"


@pytest.mark.parametrize("tiny", tiny_model_names(PLUGIN))
def test_roundtrip_and_verify(tiny: str, tmp_path: Path) -> None:
    check_tiny_model(PLUGIN, tiny, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("tiny", tiny_model_names(PLUGIN))
def test_every_layout(tiny: str, tmp_path: Path) -> None:
    check_tiny_model(PLUGIN, tiny, tmp_path, layouts=ALL_LAYOUTS, verify=False)
'''

_NOXFILE = '''\
"""The plugin's tests: `nox` (single rank and verify), `nox -- -m slow` (every layout)."""

import nox


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".", "pytest")
    session.run("pytest", "-q", "tests", *session.posargs, env={{"OMP_NUM_THREADS": "1"}})
'''

_README = """\
# {dist}

    pip install {dist}

A bridgecore plugin converting `{arch}` checkpoints between Hugging Face and
Megatron-Core, bit-exactly at any TP/PP/EP layout.

```bash
bridgecore inspect ./checkpoint           # the mapping table, with anything left unmapped
bridgecore import ./checkpoint ./megatron --tp 2
bridgecore verify ./checkpoint            # logits against transformers' {arch}
```

Development: `nox` runs the conformance tests (`bridgecore.testing`) on the tiny model; `nox -- -m slow`
adds TP2, EP2 and PP2.
"""

_CHANGELOG = """\
# Changelog

## 0.1.0

- First release: `{arch}` (config translation, mappings; tiny model and verify reference from
  transformers' class).
"""


def write_plugin(name: str, architecture: str, out: Path) -> list[Path]:
    """Write the distribution ``bridgecore-NAME`` for ``architecture`` into ``out``; the files written."""
    if not _NAME.fullmatch(name):
        raise BridgeError(f"plugin name {name!r}: expected lower-case letters, digits and _, starting with a letter")
    cls = transformers_class(architecture)
    if out.exists() and any(out.iterdir()):
        raise BridgeError(f"{out}: already exists and is not empty; choose another --out")
    module = f"bridgecore_{name}"
    values = {
        "name": name,
        "arch": architecture,
        "module": module,
        "dist": "bridgecore-" + name.replace("_", "-"),
        "core": __version__,
        "config_class": cls.config_class.__name__,
    }
    files = {
        "pyproject.toml": _PYPROJECT,
        f"src/{module}/__init__.py": _MODULE,
        f"tests/test_{name}.py": _TESTS,
        "noxfile.py": _NOXFILE,
        "README.md": _README,
        "CHANGELOG.md": _CHANGELOG,
    }
    written = []
    for relative, template in files.items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**values))
        written.append(path)
    return written
