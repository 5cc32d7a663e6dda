"""The plugin contract: the hooks a model-family plugin implements.

A plugin is a distribution with an entry point in the group ``bridgecore``, pointing at a module
(or object) whose functions are decorated with :data:`hookimpl`. Every hook takes keyword
arguments; an implementation may accept any subset of them. A model plugin answers only for
checkpoints it claims and returns ``None`` otherwise, so several plugins can be installed at once.

Call order for one conversion::

    architectures()                        which plugin owns the checkpoint (by HF architecture)
    provider_config(hf_config)             config.json  -> Megatron-Core config
    layer_spec(config, vp_stage)           config        -> megatron-core spec of this PP stage
    mappings(config, hf_keys)              every HF tensor <-> Megatron param relation
    quant_mappings(config, mappings)       amax / scale relations derived from those

Only the plugin that owns the checkpoint is asked the ``firstresult`` hooks; ``quant_mappings``
asks every plugin and joins the lists, so a generic plugin (``bridgecore-quant``) can add to any
family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from bridgecore.mapping import Mapping, MappingTable, Source
    from bridgecore.megatron.config import ModelConfig
    from bridgecore.tiny import TinyModel

PROJECT = "bridgecore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def architectures() -> list[str]:
    """The HF architectures (``config.json`` ``architectures[0]``) this plugin converts.

    Called once per plugin when the manager loads. Two plugins claiming the same architecture is an
    error naming both distributions, unless the user picks one with ``--plugin``. A checkpoint whose
    architecture no plugin claims fails with the list of installed plugins and what they claim.
    """


@hookspec(firstresult=True)
def provider_config(hf_config: dict[str, Any]) -> ModelConfig | None:
    """Translate a parsed ``config.json`` into the Megatron-Core config.

    ``hf_config`` is the plain JSON dict: remote code is never imported. Return an instance of
    :class:`bridgecore.megatron.config.ModelConfig` (a ``TransformerConfig`` with the model-level
    fields: vocab size, sequence length, rotary settings, tied embeddings, MTP depth) or a
    subclass carrying per-layer fields. Reject values the model cannot take with
    :class:`bridgecore.errors.BridgeError` naming the config key. ``firstresult``: the first
    non-None answer wins, so return None for checkpoints that are not yours.
    """


@hookspec(firstresult=True)
def layer_spec(config: ModelConfig, vp_stage: int | None) -> Any:
    """The megatron-core spec of the decoder layers this pipeline stage builds.

    Return a ``TransformerBlockSubmodules`` (or a single layer ``ModuleSpec``) for the layers of the
    current PP rank and virtual stage ``vp_stage``, as megatron-core's own
    ``get_gpt_decoder_block_spec`` does, or a :class:`bridgecore.megatron.specs.ModelSpec` that also
    names the MTP block spec. Build on megatron-core specs; never patch megatron-core.
    ``bridgecore.megatron.specs`` has helpers for the CPU-capable local specs. ``firstresult``.
    """


@hookspec(firstresult=True)
def mappings(config: ModelConfig, hf_keys: frozenset[str]) -> list[Mapping] | None:
    """Every relation between HF tensors and Megatron params, as :mod:`bridgecore.mapping` objects.

    Names on the Megatron side are *global*: layer and expert indices as if there were no pipeline
    or expert parallelism; the core translates each rank's local names. ``hf_keys`` are the tensor
    names in the checkpoint (empty on export without a source checkpoint); use them to detect layout
    variants (packed vs per-expert experts, a ``model.language_model.`` prefix) instead of guessing.
    Coverage is strict: every HF key and every Megatron param must be covered. ``firstresult``.
    """


@hookspec(firstresult=True)
def passthrough(config: ModelConfig, hf_keys: frozenset[str]) -> list[str] | None:
    """Globs of HF tensors the plugin does not convert but that belong in every export, verbatim.

    For parts of a checkpoint the Megatron model does not hold (a vision tower beside the language
    model this plugin converts). They are left out of strict coverage, kept beside a Megatron
    checkpoint (``passthrough/``) and copied unchanged into every HF export. ``firstresult``.
    """


@hookspec
def quant_mappings(config: ModelConfig, mappings: list[Mapping], hf_keys: frozenset[str]) -> list[Mapping]:
    """Extra mappings derived from the weight ``mappings`` (quantizer amax, scales).

    ``hf_keys`` are the checkpoint's tensor names (or its record's; empty without a checkpoint): a
    fused group whose HF parts are only partly quantized maps just the parts that carry state.

    Every plugin is asked and the results are joined, so the generic quant plugin derives amax
    mappings for any family while a model plugin may add family-specific ones.
    """


@hookspec
def tiny_models() -> list[TinyModel]:
    """Tiny checkpoints that keep every structural feature of the family.

    Each :class:`bridgecore.tiny.TinyModel` writes a random checkpoint in the released on-disk layout;
    ``bridgecore demo`` and the tests use them.
    """


@hookspec(firstresult=True)
def hf_reference(hf_config: dict[str, Any]) -> Any:
    """A reference forward for ``bridgecore verify``: ``fn(hf_dir, input_ids) -> logits`` or None.

    Use transformers' own model class where transformers has one (built from the plain config, never
    with remote code). ``firstresult``.
    """


@hookspec
def prepare_model(
    model: Any, config: ModelConfig, hf_keys: frozenset[str], table: MappingTable, source: Source | None
) -> None:
    """Adjust a freshly built Megatron model (one PP stage) before weights are loaded.

    Every plugin is asked. ``table`` holds every mapping (weights and ``quant_mappings``);
    ``source`` answers ``shape(name)`` / ``dtype(name)`` for the HF tensors (it can also ``read``
    when the HF checkpoint itself is at hand), so added state can take the checkpoint's shapes. The
    quant plugin attaches quantizer state (amax buffers) here when the checkpoint carries amax
    tensors; a plugin with nothing to add does not implement it.
    """


@hookspec
def export_formats() -> dict[str, Any]:
    """Extra output formats for ``bridgecore export --quant FORMAT``.

    Map a format name (``fp8``, ``nvfp4``) to ``fn(src_dir, out_dir, overwrite, max_shard_size=...)``
    that turns an exported HF checkpoint into that format, streaming tensor by tensor, and writes
    ``out_dir`` atomically. All plugins are asked.
    """
