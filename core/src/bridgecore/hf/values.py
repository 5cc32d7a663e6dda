"""config.json values checked by meaning before any plugin reads them: types, ranges, finite numbers.

Each checked key has a *kind* (:data:`KINDS`); the core knows the keys whose meaning every
transformers model shares (:data:`CORE_KEYS`), and a plugin adds its family's through the
``config_values`` hook. A key is checked at the top level, in ``text_config`` (a VL checkpoint's
language model) and in ``rope_parameters`` (transformers 5's spelling, also one object per layer
type); a list value (a per-layer list) is checked item by item; ``null`` means "the default" and is
left to the plugin. A wrong value is one line naming the key, its value and what is expected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from bridgecore.errors import BridgeError


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: kind -> (what it accepts, as the error says it).
KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "count": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "count_or_zero": (lambda v: _integer(v) and v >= 0, "an integer of 0 or more"),
    "positive": (lambda v: _number(v) and v > 0, "a finite number above 0"),
    "fraction": (lambda v: _number(v) and 0 < v <= 1, "a finite number above 0 and at most 1"),
    "probability": (lambda v: _number(v) and 0 <= v <= 1, "a finite number from 0 to 1"),
    "number": (_number, "a finite number"),
    "flag": (lambda v: isinstance(v, bool), "true or false"),
}

#: keys every transformers decoder gives the same meaning.
CORE_KEYS: dict[str, str] = {
    "num_hidden_layers": "count",
    "hidden_size": "count",
    "intermediate_size": "count",
    "num_attention_heads": "count",
    "num_key_value_heads": "count",
    "head_dim": "count",
    "vocab_size": "count",
    "max_position_embeddings": "count",
    "rms_norm_eps": "positive",
    "layer_norm_eps": "positive",
    "rope_theta": "positive",
    "partial_rotary_factor": "fraction",
    "tie_word_embeddings": "flag",
}


def check_values(hf_config: Mapping[str, Any], keys: Mapping[str, str], where: str) -> None:
    """Refuse any value of ``keys`` (key -> kind) in ``hf_config`` that its kind does not accept."""
    unknown = sorted(set(keys.values()) - KINDS.keys())
    if unknown:
        raise BridgeError(f"config value kinds {unknown} are not among {', '.join(KINDS)}")
    for path, key, value in _values(hf_config):
        kind = keys.get(key)
        if kind is None or value is None:
            continue
        accepts, expected = KINDS[kind]
        items = value if isinstance(value, list) else [value]
        if not items or not all(accepts(item) for item in items):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            each = "a list of which each item is " if isinstance(value, list) else ""
            raise BridgeError(f"{where}: {path} is {shown}; expected {each}{expected}")


def _values(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """(dotted path, key, value) of the checked places: the top level, ``text_config``, ``rope_parameters``."""
    for key, value in config.items():
        if key in ("text_config", "rope_parameters") and isinstance(value, dict):
            yield from _values(value, f"{prefix}{key}.")
            continue
        if prefix.endswith("rope_parameters.") and isinstance(value, dict):  # one object per layer type
            yield from _values(value, f"{prefix}{key}.")
            continue
        yield f"{prefix}{key}", key, value
