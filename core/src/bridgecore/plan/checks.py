"""Config sizes checked before anything is allocated: against what any model has, and against what
the checkpoint's safetensors headers declare."""

from __future__ import annotations

import math

from bridgecore.errors import BridgeError
from bridgecore.megatron.config import MODEL_SIZES, MOE_SIZES, ModelConfig

_MAX_SIZE = 2**31


def check_sizes(config: ModelConfig, where: str) -> None:
    """Refuse sizes no model has before megatron-core allocates (or overflows) with them."""
    for name in MODEL_SIZES:
        value = getattr(config, name, None)
        if value is None and name in MOE_SIZES:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < _MAX_SIZE:
            raise BridgeError(f"{where}: {name} is {value!r}; expected a positive integer below 2**31")


#: how many times more elements the model may hold than the checkpoint's files declare (packed
#: quantized tensors hold several values per element, vocabularies are padded).
_ELEMENT_SLACK = 4


def check_against_files(config: ModelConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Refuse sizes the checkpoint's safetensors headers cannot back, before anything is allocated:
    a layer needs at least one tensor, no size exceeds the largest tensor, and the embedding and one
    norm per layer fit in the elements the files declare."""
    if not shapes:
        return
    numels = [math.prod(shape) for shape in shapes.values()]
    largest, total = max(numels), sum(numels)
    if config.num_layers > len(shapes):
        raise BridgeError(
            f"{where}: num_layers is {config.num_layers}, but the checkpoint holds only {len(shapes)} tensors;"
            " expected at least one tensor per layer"
        )
    for name in MODEL_SIZES[1:]:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > largest:
            raise BridgeError(
                f"{where}: {name} is {value}, larger than the checkpoint's largest tensor ({largest} elements)"
            )
    least = config.vocab_size * config.hidden_size + config.num_layers * config.hidden_size
    if least > _ELEMENT_SLACK * total:
        raise BridgeError(
            f"{where}: vocab_size {config.vocab_size}, hidden_size {config.hidden_size} and num_layers"
            f" {config.num_layers} need at least {least} parameters, but the safetensors headers declare"
            f" {total} elements; expected a config that matches the weights"
        )
