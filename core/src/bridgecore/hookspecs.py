"""The plugin contract: the hooks a model-family plugin implements.

A plugin is a distribution with an entry point in the group ``bridgecore``, pointing at a module
(or object) whose functions are decorated with :data:`hookimpl`. Every hook takes keyword
arguments; an implementation may accept any subset of them. ``docs/plugins.md`` is the author's
guide (what to set, how to test); this module is the reference.

Call order for one conversion::

    architectures()                        which plugin owns the checkpoint (by HF architecture)
    provider_config(hf_config)             config.json  -> Megatron-Core config
    layer_spec(config, vp_stage)           config        -> megatron-core spec of this PP stage
    mappings(config, hf_keys)              every HF tensor <-> Megatron param relation
    quant_mappings(config, mappings)       amax / scale relations derived from those

Ownership, the one rule: the checkpoint's ``architectures[0]`` picks the one plugin that claims it
(``architectures`` and ``transformers_models``), and the hooks marked *owner only* below are asked of
that plugin alone. They need no "is this mine?" check. The other hooks (``architectures``,
``transformers_models``, ``tiny_models``, ``quant_mappings``, ``prepare_model``, ``export_formats``)
are asked of every plugin, which is how a generic plugin (``bridgecore-quant``) adds to any family.

Less to write: a plugin that names transformers' model class of its architecture
(``transformers_models``) gets the core's ``hf_reference`` and ``tiny_models``; see
:mod:`bridgecore.defaults`.

Keep the module light: ``bridgecore plugins`` and ``--help`` import every plugin's module to list
its architectures and hooks, and stay free of torch and megatron-core only if the hooks import those
inside their bodies. A submodule named like a hook (``mappings.py``) replaces the package attribute
of that name once imported; name such a hook's function otherwise, with ``@hookimpl(specname=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from bridgecore.mapping import Mapping, MappingTable, Source
    from bridgecore.megatron.config import ModelConfig
    from bridgecore.tiny import TinyModel

PROJECT = "bridgecore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class TransformersModel:
    """transformers' model class of one architecture, and the small config of its tiny model.

    ``architecture`` is the class name in ``transformers`` (``"LlamaForCausalLM"``), as
    ``config.json`` names it. ``tiny_config`` holds the keys the class's config takes (sizes,
    ``dtype``: the tiny checkpoint's dtype, bfloat16 when absent); None: no tiny model. ``name``
    names the tiny model in ``bridgecore demo`` (default: the architecture).
    """

    architecture: str
    tiny_config: dict[str, Any] | None = None
    name: str | None = None
    description: str = ""
    seed: int = 0
    shards: int = 2


@hookspec
def architectures() -> list[str]:
    """The HF architectures (``config.json`` ``architectures[0]``) this plugin converts.

    Called once per plugin when the manager loads. Two plugins claiming the same architecture is an
    error naming both distributions, unless the user picks one with ``--plugin``. A checkpoint whose
    architecture no plugin claims fails with the list of installed plugins and what they claim.
    Architectures named by ``transformers_models`` are claimed too; a plugin with that hook may
    leave this one out.
    """


@hookspec
def transformers_models() -> list[TransformersModel]:
    """transformers' model class of each architecture, as :class:`TransformersModel`.

    Naming the class (``TransformersModel("LlamaForCausalLM", tiny_config={...})``) claims the
    architecture and makes the core answer the hooks this plugin does not implement:
    ``hf_reference`` becomes transformers' ``from_pretrained`` on the checkpoint (fp32, safetensors
    and local files only, never remote code) and ``tiny_models`` writes a random checkpoint with the
    class's own ``save_pretrained`` from ``tiny_config``. Implement either hook yourself when the
    released layout differs from what transformers writes. Called once per plugin at load.
    """


@hookspec(firstresult=True)
def config_values() -> dict[str, str]:
    """The family's own ``config.json`` keys and the kind of value each must hold.

    *Owner only.* Map a key to a kind of :data:`bridgecore.hf.values.KINDS` (``"count"``,
    ``"count_or_zero"``, ``"positive"``, ``"fraction"``, ``"probability"``, ``"number"``, ``"flag"``);
    the core checks them, with its own :data:`~bridgecore.hf.values.CORE_KEYS` (layer and head counts,
    sizes, ``rms_norm_eps``, ``rope_theta``, ``partial_rotary_factor``, ...), before
    ``provider_config`` is called: at the top level, in ``text_config`` and in ``rope_parameters``,
    a list item by item. A wrong value is a one-line error naming the key, so ``provider_config``
    reads only values of the right type and range. Optional.
    """


@hookspec(firstresult=True)
def provider_config(hf_config: dict[str, Any]) -> ModelConfig | None:
    """Translate a parsed ``config.json`` into the Megatron-Core config.

    *Owner only.* ``hf_config`` is the plain JSON dict: remote code is never imported. Return an
    instance of :class:`bridgecore.megatron.config.ModelConfig`: a megatron-core
    ``TransformerConfig`` (``num_layers``, ``hidden_size``, ``num_attention_heads``,
    ``num_query_groups``, ``kv_channels``, ``ffn_hidden_size``, norms, activation, MoE and MTP
    settings) plus the model-level fields ``vocab_size``, ``max_sequence_length``, ``rotary_base``,
    ``rotary_percent``, ``share_embeddings_and_output_weights``; or a subclass carrying per-layer
    fields. ``params_dtype`` (with ``bf16``/``fp16``) is the checkpoint's dtype. The core sets
    ``hf_config`` itself. Reject values the model cannot take with
    :class:`bridgecore.errors.BridgeError` naming the config key. Returning None declines the
    checkpoint (an error naming the plugin).
    """


@hookspec(firstresult=True)
def layer_spec(config: ModelConfig, vp_stage: int | None) -> Any:
    """The megatron-core spec of the decoder layers this pipeline stage builds.

    Return a ``TransformerBlockSubmodules`` (or a single layer ``ModuleSpec``) for the layers of the
    current PP rank and virtual stage ``vp_stage``, as megatron-core's own
    ``get_gpt_decoder_block_spec`` does, or a :class:`bridgecore.megatron.specs.ModelSpec` that also
    names the MTP block spec. Build on megatron-core specs; never patch megatron-core.
    *Owner only.* ``bridgecore.megatron.specs.gpt_block_spec(config, vp_stage)`` is megatron-core's
    local GPT block spec (dense or MoE per layer from ``moe_layer_freq``, q/k norms from
    ``qk_layernorm``), CPU-ready; ``gpt_mtp_spec`` adds the MTP block. Write your own spec only
    for modules megatron-core's GPT layer does not have (another attention or norm kind).
    """


@hookspec(firstresult=True)
def mappings(config: ModelConfig, hf_keys: frozenset[str]) -> list[Mapping] | None:
    """Every relation between HF tensors and Megatron params, as :mod:`bridgecore.mapping` objects.

    *Owner only.* Names on the Megatron side are *global*: layer and expert indices as if there
    were no pipeline or expert parallelism; the core translates each rank's local names.
    ``{expert}`` on both sides relates per-expert HF tensors one to one; ``Stacked(inner, E)``
    relates one ``[E, ...]`` HF tensor to the per-expert params; expert params split over expert TP
    (``--etp``), the others over TP. ``layers=`` restricts a mapping to some ``{layer}`` values.
    ``hf_keys`` are the tensor names in the checkpoint (empty on export without a source
    checkpoint); use them to detect layout variants (packed vs per-expert experts, a
    ``model.language_model.`` prefix) instead of guessing. Coverage is strict: every HF key and
    every Megatron param must be covered; ``bridgecore inspect`` prints the table with the gaps.
    """


@hookspec(firstresult=True)
def passthrough(config: ModelConfig, hf_keys: frozenset[str]) -> list[str] | None:
    """Globs of HF tensors the plugin does not convert but that belong in every export, verbatim.

    For parts of a checkpoint the Megatron model does not hold (a vision tower beside the language
    model this plugin converts). They are left out of strict coverage, kept beside a Megatron
    checkpoint (``passthrough/``) and copied unchanged into every HF export. *Owner only.*
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

    Each :class:`bridgecore.tiny.TinyModel` (``name``, ``description``, ``write(out_dir)``) writes a
    random checkpoint in the released on-disk layout; ``bridgecore demo``, ``bridgecore.testing``
    and the tests use them. :func:`bridgecore.tiny.write_checkpoint` writes given tensors as HF does
    (sharded safetensors, index, config.json); :func:`bridgecore.tiny.random_tensor` draws seeded
    values. Asked of every plugin. The core provides it from ``transformers_models``.
    """


@hookspec(firstresult=True)
def hf_reference(hf_config: dict[str, Any]) -> Any:
    """A reference forward for ``bridgecore verify``: ``fn(hf_dir, input_ids) -> logits`` or None.

    *Owner only.* Use transformers' own model class where transformers has one, never with remote
    code. ``from_pretrained`` on ``hf_dir`` is allowed and is what the core's default does (it also
    applies transformers' load-time conversions, such as MoE experts fused on load, which building
    the model and calling ``load_state_dict`` does not); a released layout transformers cannot load
    needs its own renaming. The core provides it from ``transformers_models``.
    """


@hookspec
def prepare_model(
    model: Any,
    config: ModelConfig,
    hf_keys: frozenset[str],
    table: MappingTable,
    source: Source | None,
    megatron_keys: frozenset[str] | None,
) -> None:
    """Adjust a freshly built Megatron model (one PP stage) before weights are loaded.

    Every plugin is asked. ``table`` holds every mapping (weights and ``quant_mappings``);
    ``source`` answers ``shape(name)`` / ``dtype(name)`` for the HF tensors (it can also ``read``
    when the HF checkpoint itself is at hand), so added state can take the checkpoint's shapes.
    ``megatron_keys`` are the tensor keys of the Megatron checkpoint the model is built to load (an
    export), None when it is built to import into. The quant plugin attaches quantizer state (amax
    buffers) here when the checkpoint carries amax tensors; a plugin with nothing to add does not
    implement it.
    """


@hookspec
def export_formats() -> dict[str, Any]:
    """Extra output formats for ``bridgecore export --quant FORMAT``.

    Map a format name (``fp8``, ``nvfp4``) to ``fn(src_dir, out_dir, overwrite, max_shard_size=...)``
    that turns an exported HF checkpoint into that format, streaming tensor by tensor, and writes
    ``out_dir`` atomically. All plugins are asked.
    """
