"""The ``_extra_state`` entries Transformer-Engine modules load, written beside our weights.

Megatron-LM and Megatron-Bridge build their models from Transformer-Engine modules (fused norm +
linear, norms, grouped experts). Each one carries an ``_extra_state`` (its FP8 metadata, none
without FP8), which megatron-core saves as a ShardedObject next to the module's weights:
``<module>._extra_state/shard_<offset>_<shape>``, the offset and shape those of the layer and expert
axes prepended to the module's weights (``make_sharded_object_for_checkpoint``), replicated over
tensor and data parallel ranks. Under megatron-core's default load strictness a model asks for
every such entry, so a checkpoint without them does not load. Our models use megatron-core's
local modules, and only some of them carry one; :func:`add_extra_states` gives every module that
holds a weight the entry a Transformer-Engine module in its place would load, with the value such
a module saves when it has no FP8 state (``None``; Transformer Engine's ``set_extra_state`` skips
it). Loaders that do not ask for them (ours, local specs) ignore them: they are unexpected keys.
"""

from __future__ import annotations

from typing import Any

#: the parameter names after which a module's sharded prefix starts (Transformer Engine's fused
#: norm + linear names its norm ``layer_norm_weight``).
_PARAMS = ("weight", "bias", "layer_norm_weight", "layer_norm_bias")
EXTRA_STATE = "_extra_state"


def add_extra_states(state: dict[str, Any]) -> int:
    """Add the missing ``_extra_state`` ShardedObjects to a model's sharded state dict, in place.

    Call under megatron-core's parallel state of the saving rank. Returns how many were added."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    present = {v.unique_key for v in nested_values(state) if isinstance(v, ShardedObject)}
    return _add(state, present)


def _add(level: dict[str, Any], present: set[str]) -> int:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    added = 0
    for name, value in list(level.items()):
        if isinstance(value, dict):
            added += _add(value, present)
            continue
        if not isinstance(value, (ShardedTensor, ShardedTensorFactory)) or "." not in value.key:
            continue
        module, param = value.key.rsplit(".", 1)
        if param not in _PARAMS:
            continue
        extra = _extra_state(f"{module}.{EXTRA_STATE}", _first_tensor(value))
        if extra.unique_key in present:
            continue
        present.add(extra.unique_key)
        level[f"{name.rsplit('.', 1)[0]}.{EXTRA_STATE}"] = extra
        added += 1
    return added


def _first_tensor(value: Any) -> Any:
    """The ShardedTensor itself, or the first one a factory (a fused gate/up) builds."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if not isinstance(value, ShardedTensorFactory):
        return value
    built = value.build()
    return next(iter(nested_values(built if isinstance(built, dict) else {"": built})))


def _extra_state(key: str, weight: Any) -> Any:
    """The ShardedObject a Transformer-Engine module beside ``weight`` saves under ``key``."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    axes = weight.prepend_axis_num
    shape = tuple(weight.global_shape[:axes]) or (1,)
    offset = tuple(weight.global_offset[:axes]) or (0,)
    expert = ".experts." in key
    tp_rank = ps.get_expert_tensor_parallel_rank() if expert else ps.get_tensor_model_parallel_rank()
    replica = weight.replica_id
    # A copy of another stage's weight (the tied embedding on a later stage) keeps its copy mark, so
    # its module's entry is not saved twice.
    copy, dp_replica = (replica[0], replica[-1]) if isinstance(replica, tuple) else (0, replica)
    return ShardedObject(key, None, shape, offset, replica_id=(copy, tp_rank, dp_replica))
