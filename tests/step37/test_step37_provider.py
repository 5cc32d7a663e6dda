"""config.json -> Step37Config: the released text_config lacks keys Step-3.5 has; vision fields."""

from __future__ import annotations

import copy

import pytest
from step37_testing import RELEASED

from bridgecore.errors import BridgeError
from bridgecore.plugins import Plugins
from bridgecore_step37.provider import Step37Config, step37_model_config
from bridgecore_step37.tiny import TINY_CONFIG


def test_released_config_with_absent_text_fields() -> None:
    config = step37_model_config(RELEASED)
    assert isinstance(config, Step37Config)
    assert config.layernorm_zero_centered_gamma is True  # zero_centered absent -> true
    assert config.qk_layernorm is True  # use_qk_norm absent -> true
    assert config.share_embeddings_and_output_weights is False  # tie_word_embeddings absent -> false
    assert (config.num_layers, config.mtp_num_layers, config.num_moe_experts) == (45, 3, 288)
    assert len(config.layer_types) == 48 and config.sliding_num_attention_heads == 96
    assert config.moe_router_topk_scaling_factor == 3.0 and config.vocab_size == 128896
    assert (config.image_token_id, config.projector_bias) == (128001, False)
    vision = config.vision
    assert (vision.width, vision.layers, vision.heads, vision.head_dim) == (1536, 47, 16, 96)
    assert (vision.intermediate_size, vision.grid, vision.rope_theta) == (8960, 52, 10000.0)
    assert config.projector_input_size == 6144


def test_top_level_defaults_when_absent() -> None:
    cfg = {
        k: v
        for k, v in RELEASED.items()
        if k not in ("image_token_id", "projector_bias", "understand_projector_stride")
    }
    config = step37_model_config(cfg)
    assert (config.image_token_id, config.projector_bias) == (128001, False)


def test_explicit_text_fields_win() -> None:
    cfg = copy.deepcopy(RELEASED)
    cfg["text_config"] |= {"zero_centered": False, "use_qk_norm": False, "tie_word_embeddings": True}
    config = step37_model_config(cfg)
    assert not config.layernorm_zero_centered_gamma and not config.qk_layernorm
    assert config.share_embeddings_and_output_weights


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("vision_config", "use_cls_token"), True, "use_cls_token"),
        (("vision_config", "use_ln_post"), True, "use_ln_post"),
        (("vision_config", "hidden_act"), "gelu", "hidden_act"),
        (("vision_config", "heads"), 256, "divisible by 4"),
        (("understand_projector_stride",), 3, "understand_projector_stride"),
        (("vision_config", "rope_parameters"), {"rope_type": "default", "rope_theta": 1e4}, "rope_type is 'default'"),
        (("vision_config", "rope_parameters"), {"rope_type": "axial", "factor": 2.0}, r"has \['factor'\]"),
        (("text_config", "rope_parameters"), {"rope_type": "default", "rope_theta": 1e4}, "one object per layer type"),
    ],
)
def test_rejects_what_the_tower_cannot_run(path: tuple[str, ...], value: object, message: str) -> None:
    cfg = copy.deepcopy(RELEASED)
    target = cfg
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(BridgeError, match=message):
        step37_model_config(cfg)


def test_missing_sub_config() -> None:
    with pytest.raises(BridgeError, match="vision_config"):
        step37_model_config({k: v for k, v in RELEASED.items() if k != "vision_config"})


def test_plugin_claims_step3p7_only() -> None:
    import bridgecore_step37

    plugins = Plugins(load_entry_points=False)
    plugins.register(bridgecore_step37, name="step37")
    assert plugins.choose(TINY_CONFIG).name == "step37"
    assert bridgecore_step37.provider_config(hf_config={"architectures": ["Step3p5ForCausalLM"]}) is None
    assert [t.name for t in plugins.call_all("tiny_models")[0]] == ["step37"]
    assert plugins.call_all("hf_reference", hf_config=TINY_CONFIG) is not None


def test_vision_keys_in_either_naming() -> None:
    cfg = copy.deepcopy(RELEASED)
    pe = cfg["vision_config"]
    pe["hidden_size"], pe["num_attention_heads"], pe["num_hidden_layers"] = pe.pop("width"), pe.pop("heads"), 2
    pe.pop("layers")
    vision = step37_model_config(cfg).vision
    assert (vision.width, vision.heads, vision.layers) == (1536, 16, 2)
    del pe["num_hidden_layers"]
    with pytest.raises(BridgeError, match=r"lacks layers \(or num_hidden_layers\)"):
        step37_model_config(cfg)
