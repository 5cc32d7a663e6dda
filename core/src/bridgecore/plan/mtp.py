"""MTP layers a config declares but a checkpoint does not hold.

transformers' `save_pretrained` drops the multi-token-prediction tensors (its models do not hold
them) while keeping the config key that declares them (`mtp_num_hidden_layers`,
`num_nextn_predict_layers`). Such a checkpoint converts without MTP: the Megatron model is built
with no MTP layers, config.json is kept as read, so export writes back exactly the source.
Megatron params of MTP layers are named `[prefix.]mtp.layers.<i>.`; a checkpoint holds MTP when any
HF tensor a mapping of those params names is present.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Sequence

from bridgecore.mapping.types import Mapping
from bridgecore.megatron.config import ModelConfig

_MTP_LAYER = re.compile(r"(?:^|\.)mtp\.layers\.(?:\{([a-z_]+)\}|(\d+))\.")


def mtp_tensor_patterns(mappings: Sequence[Mapping], num_layers: int) -> list[re.Pattern[str]]:
    """Regexes of the HF tensors the mappings of MTP params name, for MTP layers 0..num_layers-1."""
    found = []
    for mapping in mappings:
        m = _MTP_LAYER.search(mapping.megatron.text)
        if m is None:
            continue
        layers = range(num_layers) if m.group(1) else [int(m.group(2))]
        for j in layers:
            captures = {m.group(1): j} if m.group(1) else {}
            found += [hf.partial_regex(captures) for hf in mapping.hf]
    return found


def without_absent_mtp(
    config: ModelConfig, mappings: Sequence[Mapping], hf_keys: Collection[str]
) -> tuple[ModelConfig, str | None]:
    """``config`` without MTP layers, and a note saying so, when the checkpoint holds none of theirs."""
    layers = config.mtp_num_layers or 0
    if not layers or not hf_keys:
        return config, None
    patterns = mtp_tensor_patterns(mappings, layers)
    if not patterns:
        return config, None
    held = re.compile("|".join(f"(?:{p.pattern})" for p in patterns))
    if any(held.match(k) for k in hf_keys):
        return config, None
    note = (
        f"config.json declares {layers} MTP layer{'s' * (layers > 1)} but the checkpoint holds none of"
        " their tensors (transformers' save_pretrained drops them): converting without MTP; export"
        " writes back the same config.json and tensors"
    )
    return dataclasses.replace(config, mtp_num_layers=None), note
