"""Megatron checkpoints bridgecore did not write: what Megatron-LM and Megatron-Bridge save while training.

    <dir>/latest_checkpointed_iteration.txt   "100" (the last saved iteration) or "release"
    <dir>/iter_0000100/                       one torch_dist save of model, optimizer and RNG state;
                                              its common state (common.pt, or megatron-core 0.19's
                                              common_state object) holds the run's ``args``
    <dir>/release/

Only the model's tensors are read: the load asks megatron-core for the model's own sharded keys,
so optimizer and RNG chunks stay on disk, and the common state is read once, through torch's
``weights_only`` unpickler and megatron-core's allowlist, for the ``args`` that say the model sizes.
Those sizes, the layer count and every saved tensor's global shape are checked against the HF
config before anything is loaded or written.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bridgecore.errors import BridgeError
from bridgecore.megatron.dcp import RELEASE, TRACKER, check_pickles, read_common, read_dcp_metadata
from bridgecore.megatron.state import sharded_state_dict

if TYPE_CHECKING:
    from bridgecore.megatron.config import ModelConfig

ITERATION_DIR = "iter_{:07d}"
#: ``args`` fields of a Megatron-LM run and the ModelConfig fields they must equal.
ARGS_SIZES = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "kv_channels": "kv_channels",
    "num_experts": "num_moe_experts",
    "moe_ffn_hidden_size": "moe_ffn_hidden_size",
    "padded_vocab_size": "vocab_size",
    "mtp_num_layers": "mtp_num_layers",
}
#: keys of a training checkpoint that are not model weights.
_NOT_MODEL = re.compile(r"^(optimizer\.|rng_state|rerun_state)")


def torch_dist_dir(ckpt_dir: str | Path, iteration: int | None = None) -> Path:
    """The torch_dist directory of a Megatron checkpoint: ``iter_NNNNNNN/`` for ``iteration``, else
    the one the tracker names, else ``release/``, else ``ckpt_dir`` itself when it is one save."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise BridgeError(f"{ckpt_dir}: not a directory; expected a Megatron checkpoint directory")
    saved = sorted(p.name for p in ckpt_dir.glob("iter_*") if p.is_dir())
    if iteration is not None:
        found = ckpt_dir / ITERATION_DIR.format(iteration)
        if not found.is_dir():
            have = ", ".join(saved[-5:]) or "no iter_* directories"
            raise BridgeError(f"{ckpt_dir}: no iteration {iteration} (expected {found.name}/; found {have})")
        return _torch_dist(found)
    tracker = ckpt_dir / TRACKER
    if tracker.is_file():
        text = tracker.read_text(errors="replace").strip()
        if text == RELEASE:
            found = ckpt_dir / RELEASE
        elif text.isdigit():
            found = ckpt_dir / ITERATION_DIR.format(int(text))
        else:
            raise BridgeError(f"{tracker}: holds {text[:40]!r}; expected an iteration number or 'release'")
        if not found.is_dir():
            raise BridgeError(f"{tracker}: names {found.name}/, which {ckpt_dir} does not hold")
        return _torch_dist(found)
    if (ckpt_dir / RELEASE).is_dir():
        return _torch_dist(ckpt_dir / RELEASE)
    if (ckpt_dir / ".metadata").is_file():
        return _torch_dist(ckpt_dir)
    raise BridgeError(
        f"{ckpt_dir}: not a Megatron checkpoint (expected {TRACKER}, iter_NNNNNNN/ or {RELEASE}/"
        f"{', found ' + ', '.join(saved[-3:]) if saved else ''})"
    )


def _torch_dist(path: Path) -> Path:
    """``path`` if it holds a torch_dist save, else a one-line error saying what it holds."""
    config = path / "metadata.json"
    if (path / ".metadata").is_file() and config.is_file():
        try:
            backend = json.loads(config.read_text()).get("sharded_backend")
        except (json.JSONDecodeError, AttributeError):
            backend = None
        if backend == "torch_dist":
            return path
        raise BridgeError(f"{config}: sharded_backend is {backend!r}; bridgecore reads torch_dist checkpoints")
    if any(path.glob("mp_rank_*")):
        raise BridgeError(
            f"{path}: a legacy per-rank checkpoint (mp_rank_*/model_optim_rng.pt);"
            " bridgecore reads torch_dist checkpoints (Megatron-LM --ckpt-format torch_dist)"
        )
    raise BridgeError(f"{path}: no torch_dist checkpoint here (expected .metadata and metadata.json)")


def saved_metadata(path: Path) -> Any:
    """The ``.metadata`` of a torch_dist save, unpickled with the allowlist of ``check_pickles``."""
    import megatron.core  # noqa: F401 - registers megatron-core's classes with torch's weights_only loader

    check_pickles(path)
    return read_dcp_metadata(path)


def saved_args(path: Path) -> tuple[Any, str] | None:
    """The ``args`` namespace a Megatron-LM run saved in its common state, and where; None if it saved
    none (vetted by ``check_pickles``)."""
    import megatron.core  # noqa: F401 - registers megatron-core's classes with torch's weights_only loader

    found = read_common(path)
    if found is None or not isinstance(found[0], dict) or found[0].get("args") is None:
        return None
    return found[0]["args"], found[1]


def check_args(config: ModelConfig, args: Any, where: str) -> None:
    """Refuse a checkpoint whose saved model sizes differ from the HF config's, naming the first one."""
    fields = dict(ARGS_SIZES)
    if getattr(args, "group_query_attention", False):
        fields["num_query_groups"] = "num_query_groups"
    if getattr(config, "num_moe_experts", None):
        # A run whose layers are all MoE may leave the dense FFN size at its default; the saved
        # tensors' shapes still check it wherever a dense layer uses it.
        del fields["ffn_hidden_size"]
    for arg, field in fields.items():
        saved, ours = getattr(args, arg, None), getattr(config, field, None)
        if saved is None or ours is None or saved == ours:
            continue
        raise BridgeError(
            f"{where}: args.{arg} is {saved} in the checkpoint but the HF config gives {field} {ours};"
            " pass the --hf-config of the model that was trained"
        )


def check_model_keys(config: ModelConfig, requested: list[Any], metadata: Any, where: str) -> None:
    """Refuse a checkpoint that lacks the model's tensors or holds them at other sizes, in one line.

    ``requested`` are the ShardedTensors a model built from the HF config loads (this rank's).
    """
    saved = metadata.state_dict_metadata
    _check_count(saved, r"decoder\.layers\.(\d+)\.", "decoder", "num_layers", config.num_layers, where)
    _check_count(
        saved, r"mtp\.layers\.(\d+)\.", "MTP", "mtp_num_layers", getattr(config, "mtp_num_layers", None), where
    )
    missing = [t for t in requested if t.key not in saved]
    if missing and len(missing) == len(requested):
        model_keys = sorted(k for k in saved if not _NOT_MODEL.match(k))
        if not model_keys:
            raise BridgeError(
                f"{where}: holds no model weights ({len(saved)} entries, all optimizer or RNG state);"
                " save the checkpoint with its model (Megatron-LM without --no-save-model)"
            )
        raise BridgeError(
            f"{where}: unknown key layout: none of the {len(requested)} model tensors the HF config implies"
            f" is there (expected e.g. {requested[0].key}; the checkpoint has e.g. {model_keys[0]})"
        )
    if missing:
        raise BridgeError(
            f"{where}: lacks {len(missing)} of the {len(requested)} model tensors the HF config implies,"
            f" e.g. {missing[0].key}"
        )
    for t in requested:
        entry = saved[t.key]
        if not hasattr(entry, "size"):
            raise BridgeError(f"{where}: {t.key} is saved as an object, expected a tensor")
        if tuple(entry.size) != tuple(t.global_shape):
            raise BridgeError(
                f"{where}: {t.key} has shape {list(entry.size)} in the checkpoint but {list(t.global_shape)}"
                f" by the HF config{_differing_field(config, tuple(entry.size), tuple(t.global_shape))}"
            )
        dtype = entry.properties.dtype
        if dtype != t.dtype and torch.promote_types(dtype, t.dtype) != t.dtype:
            raise BridgeError(
                f"{where}: {t.key} is {str(dtype).removeprefix('torch.')} in the checkpoint, the model's params"
                f" are {str(t.dtype).removeprefix('torch.')}; build the model with params_dtype={dtype}"
            )


def _check_count(saved: dict[str, Any], pattern: str, label: str, field: str, expected: int | None, where: str) -> None:
    found = {int(m.group(1)) for k in saved if (m := re.match(pattern, k))}
    count = max(found) + 1 if found else 0
    if found and count != (expected or 0):
        raise BridgeError(f"{where}: holds {count} {label} layers but the HF config gives {field} {expected}")


def _differing_field(config: ModelConfig, saved: tuple[int, ...], ours: tuple[int, ...]) -> str:
    """`` (hidden_size 64, 128 saved)``: the config size a differing dimension comes from, when one does."""
    if len(saved) != len(ours):
        return ""
    from bridgecore.megatron.config import MODEL_SIZES

    for mine, theirs in zip(ours, saved, strict=True):
        if mine != theirs:
            fields = [f for f in MODEL_SIZES if getattr(config, f, None) == mine]
            if fields:
                return f" ({fields[0]} {mine}, {theirs} saved)"
    return ""


#: megatron-core's sharded-state-dict flags that change the saved keys, as trainers may set them:
#: per-layer keys even for identical layers, and each rank's shard (each expert) under its own key.
KEY_LAYOUTS: tuple[dict[str, Any], ...] = ({}, {"non_homogeneous_layers": True}, {"singleton_local_shards": True})


def key_layout(chunks: list[torch.nn.Module], metadata: Any) -> dict[str, Any]:
    """The first of ``KEY_LAYOUTS`` under which the saved keys hold every tensor of every rank's
    ``chunks`` (a collective under torchrun); ``{}`` when none does, left for ``check_model_keys``."""
    from bridgecore.megatron import parallel
    from bridgecore.megatron.compat import cpu_compat

    saved = metadata.state_dict_metadata
    fits = []
    with cpu_compat("meta" if any(p.is_meta for c in chunks for p in c.parameters()) else "cpu"):
        for flags in KEY_LAYOUTS:
            state = {str(i): sharded_state_dict(chunk, flags) for i, chunk in enumerate(chunks)}
            fits.append(all(t.key in saved for t in requested_tensors(state)))
    everywhere = [all(f) for f in zip(*parallel.all_gather_objects(fits), strict=True)]
    return next((flags for flags, fit in zip(KEY_LAYOUTS, everywhere, strict=True) if fit), {})


def requested_tensors(state: dict[str, Any]) -> list[Any]:
    """The ShardedTensors a sharded state dict loads, with its factories (fused gate/up) built."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    found = []
    for item in nested_values(state):
        if isinstance(item, ShardedTensorFactory):
            built = item.build()
            found.extend(v for v in nested_values(built if isinstance(built, dict) else {"": built}))
        elif isinstance(item, ShardedTensor):
            found.append(item)
    return [t for t in found if isinstance(t, ShardedTensor)]


def saved_float_dtype(metadata: Any) -> torch.dtype | None:
    """The dtype most of the saved model tensors have (the run's params dtype)."""
    counts = collections.Counter(
        entry.properties.dtype
        for key, entry in metadata.state_dict_metadata.items()
        if hasattr(entry, "properties") and not _NOT_MODEL.match(key) and entry.properties.dtype.is_floating_point
    )
    return counts.most_common(1)[0][0] if counts else None


def config_dtype(hf_config: dict[str, Any], where: Path, missing: str | None = None) -> torch.dtype:
    """The floating dtype config.json names (``dtype`` or ``torch_dtype``, top level or text config);
    ``missing`` says why one is needed when it names none."""
    text = hf_config.get("text_config") if isinstance(hf_config.get("text_config"), dict) else {}
    for holder in (hf_config, text):
        for key in ("dtype", "torch_dtype"):
            name = holder.get(key)
            if isinstance(name, str):
                dtype = getattr(torch, name.removeprefix("torch."), None)
                if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
                    return dtype
                raise BridgeError(f"{where}: {key} is {name!r}; expected a floating-point torch dtype name")
    raise BridgeError(
        f"{where}: names no dtype or torch_dtype"
        + (
            missing
            or " and its directory has no safetensors files; pass the HF checkpoint directory as --hf-config"
            " so the export knows which dtype to write"
        )
    )


def load_model_only(state: dict[str, Any], release: Path) -> dict[str, Any]:
    """megatron-core's load of ``state`` from ``release`` with ``common.pt`` left unread: the model's
    tensors need nothing from it (args, scheduler and optimizer param groups stay on disk), and a
    Megatron-LM ``common.pt`` pickles ``args``, which a weights-only load refuses. megatron-core 0.16
    takes a common-load strategy for that; 0.19 reads the common state itself, which is skipped here
    for the call."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import serialization

    from bridgecore.megatron.dcp import common_in_shards

    if not common_in_shards():
        from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

        class ModelOnlyCommonLoad(TorchCommonLoadStrategy):
            def load_common(self, checkpoint_dir: str | Path) -> dict[str, Any]:
                return {}

        return dist_checkpointing.load(state, str(release), common_strategy=ModelOnlyCommonLoad())
    read_common = serialization.load_common_state_dict
    serialization.load_common_state_dict = lambda checkpoint_dir: {}
    try:
        return dist_checkpointing.load(state, str(release))
    finally:
        serialization.load_common_state_dict = read_common
