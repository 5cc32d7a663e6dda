"""What the core provides when a plugin names transformers' model class of an architecture.

A plugin whose ``transformers_models`` hook returns :class:`~bridgecore.hookspecs.TransformersModel`
entries gets, for
each hook it does not implement itself:

- ``hf_reference``: transformers' ``from_pretrained`` of that class on the checkpoint directory, in
  fp32, from safetensors only, with local files only and never remote code;
- ``tiny_models``: for each entry with a ``tiny_config``, a checkpoint written by that class's own
  ``save_pretrained`` from that config, with seeded random weights.

A plugin that needs another on-disk layout than transformers writes (a released checkpoint whose
tensor names differ from the class's) implements those hooks itself; its own implementation is
always the one called.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from bridgecore.errors import BridgeError
from bridgecore.hookspecs import TransformersModel, hookimpl

if TYPE_CHECKING:  # imported where used, so that listing plugins imports no torch
    import torch

    from bridgecore.tiny import TinyModel


def tiny_model_of(entry: TransformersModel) -> TinyModel:
    """The tiny model of a ``transformers_models`` entry: a checkpoint its class's own ``save_pretrained``
    writes from the entry's ``tiny_config``, with seeded random weights."""
    from bridgecore.tiny import TinyModel

    config = {**(entry.tiny_config or {}), "architectures": [entry.architecture]}
    description = entry.description or f"{entry.architecture} made by transformers' own class"
    return TinyModel(
        entry.name or entry.architecture,
        description,
        lambda out: write_transformers_checkpoint(out, config, seed=entry.seed, shards=entry.shards),
    )


def transformers_class(architecture: str) -> type:
    """transformers' model class named ``architecture``, or an error naming the installed version."""
    try:
        import transformers
    except ImportError:
        raise BridgeError(
            f"architecture {architecture}: the tiny model and verify reference come from transformers,"
            " which is not installed; pip install transformers"
        ) from None

    cls = getattr(transformers, architecture, None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise BridgeError(
            f"architecture {architecture}: transformers {transformers.__version__} has no model class of that name"
        )
    return cls


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Without transformers' progress bars, which would interleave with bridgecore's own output."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def write_transformers_checkpoint(out: Path, config: dict[str, Any], seed: int = 0, shards: int = 2) -> None:
    """A random checkpoint of ``config["architectures"][0]``, written by transformers itself.

    The model is transformers' class built from ``config``; every parameter is drawn from a generator
    seeded with ``seed`` (norm-like vectors around 1, everything else Normal(0, 0.02)), so a
    mapping that swaps two tensors of equal shape changes the result. It is saved in ``config``'s
    ``dtype`` (default bfloat16) by ``save_pretrained`` in about ``shards`` safetensors files.
    """
    import torch

    from bridgecore.tiny import random_tensor

    architecture = (config.get("architectures") or [None])[0]
    if not architecture:
        raise BridgeError("tiny config: 'architectures' names no transformers model class")
    cls = transformers_class(architecture)
    kwargs = {k: v for k, v in config.items() if k not in ("architectures", "dtype", "torch_dtype")}
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"))
    model = cls(cls.config_class(**kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and name.endswith("weight"):
                param.copy_(1 + random_tensor(param.shape, torch.float32, generator, std=0.1))
            else:
                param.copy_(random_tensor(param.shape, torch.float32, generator))
    model = model.to(dtype)
    sizes = [p.numel() * p.element_size() for p in model.state_dict().values()]
    # save_pretrained fills each file up to the limit; the largest tensor on top keeps the count at `shards`.
    limit = -(-sum(sizes) // max(1, shards)) + max(sizes)
    with _quiet_transformers():
        model.save_pretrained(Path(out), max_shard_size=limit)


def reference_logits(hf_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of transformers' class for the checkpoint in ``hf_dir`` (the default reference).

    ``from_pretrained`` reads safetensors only, local files only, and never remote code
    (``trust_remote_code=False`` on a concrete class: ``auto_map`` is never followed). Loading
    through it also applies transformers' own weight conversions (e.g. experts fused on load).
    """
    import torch

    architecture = (json.loads((Path(hf_dir) / "config.json").read_text()).get("architectures") or [None])[0]
    cls = transformers_class(str(architecture))
    with _quiet_transformers():
        model = cls.from_pretrained(
            str(hf_dir), dtype=torch.float32, trust_remote_code=False, local_files_only=True, use_safetensors=True
        ).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def default_hooks(models: list[TransformersModel], implemented: set[str]) -> Any | None:
    """A pluggy plugin holding the defaults for the hooks a plugin does not implement, or None."""
    hooks = {}
    if "hf_reference" not in implemented:
        arches = {m.architecture for m in models}

        @hookimpl
        def hf_reference(hf_config: dict[str, Any]) -> Any:
            return reference_logits if (hf_config.get("architectures") or [None])[0] in arches else None

        hooks["hf_reference"] = hf_reference
    if "tiny_models" not in implemented:

        @hookimpl
        def tiny_models() -> list[TinyModel]:
            return [tiny_model_of(m) for m in models if m.tiny_config is not None]

        hooks["tiny_models"] = tiny_models
    return SimpleNamespace(**hooks) if hooks else None
