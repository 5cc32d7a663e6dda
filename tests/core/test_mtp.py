"""MTP layers a config declares but a checkpoint lacks (transformers' save_pretrained drops them)."""

from __future__ import annotations

import pytest

from bridgecore.mapping import ColumnParallel, Pattern, Replicated
from bridgecore.megatron.config import ModelConfig
from bridgecore.plan.mtp import mtp_tensor_patterns, without_absent_mtp

#: a decoder of 2 layers and 1 MTP layer whose HF names follow the decoder's (`layers.{mtp+2}`), the
#: Step-3.5 layout, plus a literal per-layer mapping under a Megatron prefix.
MAPPINGS = [
    Replicated("decoder.layers.{layer}.input_layernorm.weight", "model.layers.{layer}.input_layernorm.weight"),
    Replicated("mtp.layers.{mtp}.enorm.weight", "model.layers.{mtp+2}.enorm.weight"),
    Replicated(
        "mtp.layers.{mtp}.transformer_layer.input_layernorm.weight", "model.layers.{mtp+2}.input_layernorm.weight"
    ),
    ColumnParallel("lm.mtp.layers.0.experts.{expert}.fc1.weight", "mtp.layers.0.mlp.experts.{expert}.up.weight"),
]
DECODER = {f"model.layers.{i}.input_layernorm.weight" for i in range(2)}


def _config(mtp: int | None) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=8, num_attention_heads=2, mtp_num_layers=mtp, vocab_size=16)


def test_patterns_name_only_the_mtp_layers_tensors() -> None:
    patterns = mtp_tensor_patterns(MAPPINGS, 1)
    names = {p.pattern for p in patterns}
    assert len(patterns) == 3
    assert not any(p.match(k) for p in patterns for k in DECODER)  # layers.{mtp+2} is layer 2, not 0 or 1
    assert any(p.match("model.layers.2.enorm.weight") for p in patterns)
    assert any(p.match("mtp.layers.0.mlp.experts.17.up.weight") for p in patterns), names


@pytest.mark.parametrize(
    ("extra", "kept"),
    [
        (set(), False),  # declared, none held: left out
        ({"model.layers.2.enorm.weight"}, True),  # some held: kept (coverage then names what is missing)
        ({"mtp.layers.0.mlp.experts.3.up.weight"}, True),
    ],
)
def test_without_absent_mtp(extra: set[str], kept: bool) -> None:
    config, note = without_absent_mtp(_config(1), MAPPINGS, DECODER | extra)
    assert (config.mtp_num_layers == 1) == kept
    assert (note is None) == kept
    if note:
        assert "declares 1 MTP layer" in note and "converting without MTP" in note


def test_nothing_to_do_without_mtp_or_keys() -> None:
    config = _config(None)
    assert without_absent_mtp(config, MAPPINGS, DECODER) == (config, None)
    declared = _config(1)
    assert without_absent_mtp(declared, MAPPINGS, set()) == (declared, None)  # no source: keep the config


def test_partial_regex_fixes_the_named_captures() -> None:
    pattern = Pattern("model.layers.{mtp+45}.experts.{expert}.w")
    regex = pattern.partial_regex({"mtp": 1})
    assert regex.match("model.layers.46.experts.0.w") and regex.match("model.layers.46.experts.123.w")
    assert not regex.match("model.layers.45.experts.0.w") and not regex.match("model.layers.46.experts.0.w.x")
