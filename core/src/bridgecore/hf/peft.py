"""Hugging Face PEFT LoRA adapters on disk: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT saves each adapted module's two weights under ``base_model.model.<module>.lora_A.weight`` and
``.lora_B.weight`` (``<module>.weight`` being the base weight), DoRA's magnitude (``use_dora``) as
``.lora_magnitude_vector``, and the adapter's scale as ``lora_alpha / r``, per module where
``alpha_pattern`` / ``rank_pattern`` name it. LoRA and DoRA are read: a config key that would
change the numbers otherwise (rsLoRA, adapter biases, transposed weights, whole modules saved beside
the adapter) is refused by name rather than ignored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bridgecore.errors import BridgeError
from bridgecore.hf.writer import check_target, move_into_place, remove_temporary, temporary_sibling

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")

#: config keys whose value, unless it is this default, changes what the adapter computes.
NUMERIC_DEFAULTS: dict[str, Any] = {
    "use_rslora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "bias": "none",
    "modules_to_save": None,
    "layer_replication": None,
    "use_qalora": False,
    "use_bdlora": None,
    "alora_invocation_tokens": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "megatron_config": None,
}
#: keys that say how the adapter was trained, found, or saved; none changes its numbers.
KNOWN = {
    "peft_type", "r", "lora_alpha", "use_dora", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
    "base_model_name_or_path", "task_type", "inference_mode", "lora_dropout", "init_lora_weights",
    "layers_to_transform", "layers_pattern", "revision", "auto_mapping", "peft_version", "megatron_core",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "kasa_config", "arrow_config",
    "monteclora_config", "velora_config", "qalora_group_size", "ensure_weight_tying",
}  # fmt: skip


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter: per HF module (base weight's name without ``.weight``) its A and B, and with
    ``use_dora`` its magnitude."""

    r: int
    alpha: float
    a: dict[str, torch.Tensor] = field(default_factory=dict)
    b: dict[str, torch.Tensor] = field(default_factory=dict)
    magnitude: dict[str, torch.Tensor] = field(default_factory=dict)
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None

    def alpha_of(self, module: str) -> float:
        return _pattern(self.alpha_pattern, module, self.alpha)

    def scale_of(self, module: str) -> float:
        return self.alpha_of(module) / self.a[module].shape[0]


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: the first pattern that matches the module name's end (after a dot)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def read_peft(path: str | Path) -> PeftAdapter:
    """Read a PEFT LoRA adapter directory, refusing what this reader would get wrong."""
    from safetensors import safe_open

    path = Path(path)
    config_file, weights = path / CONFIG, path / WEIGHTS
    if not config_file.is_file():
        raise BridgeError(f"{config_file}: missing; expected a PEFT adapter directory ({CONFIG} + {WEIGHTS})")
    if not weights.is_file():
        bins = path / "adapter_model.bin"
        hint = " (a pickle adapter_model.bin is never loaded: save it with safetensors)" if bins.exists() else ""
        raise BridgeError(f"{weights}: missing{hint}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BridgeError(f"{config_file}: not JSON ({err})") from None
    if config.get("peft_type") != "LORA":
        raise BridgeError(f"{config_file}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters convert")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise BridgeError(f"{config_file}: {key} is {config.get(key)!r}; expected a positive number")
    for key, default in NUMERIC_DEFAULTS.items():
        if config.get(key, default) not in (default, None, False, {}, []):
            raise BridgeError(f"{config_file}: {key} is {config[key]!r}; only plain LoRA converts ({key}={default!r})")
    unknown = sorted(k for k in config if k not in KNOWN and k not in NUMERIC_DEFAULTS and config[k])
    if unknown:
        raise BridgeError(
            f"{config_file}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} set and not understood;"
            " refusing rather than converting an adapter whose numbers may differ"
        )
    adapter = PeftAdapter(
        r=int(config["r"]),
        alpha=config["lora_alpha"],
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        use_dora=bool(config.get("use_dora", False)),
    )
    found = {"lora_A.weight": adapter.a, "lora_B.weight": adapter.b, "lora_magnitude_vector": adapter.magnitude}
    try:
        with safe_open(weights, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no iteration
                m = _KEY.match(key)
                if m is None:
                    raise BridgeError(f"{weights}: {key} is not a LoRA weight ({PREFIX}<module>.lora_A/B.weight)")
                found[m.group(2)][m.group(1)] = f.get_tensor(key)
    except BridgeError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors' own errors, on a file that is not one
        raise BridgeError(f"{weights}: not a readable safetensors file ({err})") from None
    for module in sorted(adapter.a.keys() ^ adapter.b.keys()):
        which = "lora_B" if module in adapter.a else "lora_A"
        raise BridgeError(f"{weights}: {PREFIX}{module}.{which}.weight is missing")
    if adapter.use_dora:
        for module in sorted(adapter.a.keys() ^ adapter.magnitude.keys()):
            which = "lora_magnitude_vector" if module in adapter.a else "lora_A.weight"
            raise BridgeError(f"{weights}: {PREFIX}{module}.{which} is missing ({CONFIG} has use_dora)")
    elif adapter.magnitude:
        raise BridgeError(f"{weights}: holds lora_magnitude_vector tensors (DoRA), but {CONFIG} has no use_dora")
    for module, a in adapter.a.items():
        b = adapter.b[module]
        magnitude = adapter.magnitude.get(module)
        if magnitude is not None and tuple(magnitude.shape) != (b.shape[0],):
            raise BridgeError(
                f"{weights}: {module}.lora_magnitude_vector has shape {list(magnitude.shape)}; expected [{b.shape[0]}]"
            )
        rank = _pattern(adapter.rank_pattern, module, adapter.r)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise BridgeError(
                f"{weights}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; expected rank {rank}"
                " (r / rank_pattern) in both"
            )
    return adapter


def write_peft(path: str | Path, adapter: PeftAdapter, overwrite: bool = False) -> Path:
    """Write ``adapter`` as a PEFT directory, whole or not at all (built beside it, then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    check_target(path, overwrite)
    modules = sorted(adapter.a)
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "r": adapter.r,
        "lora_alpha": adapter.alpha,
        "rank_pattern": adapter.rank_pattern,
        "alpha_pattern": adapter.alpha_pattern,
        "target_modules": leaves,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": adapter.use_dora,
        "use_rslora": False,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    tensors = {}
    for m in modules:
        # a copy each: modules of one fused linear share one A, and safetensors refuses shared memory
        tensors[f"{PREFIX}{m}.lora_A.weight"] = adapter.a[m].clone(memory_format=torch.contiguous_format)
        tensors[f"{PREFIX}{m}.lora_B.weight"] = adapter.b[m].clone(memory_format=torch.contiguous_format)
        if adapter.use_dora:
            tensors[f"{PREFIX}{m}.lora_magnitude_vector"] = adapter.magnitude[m].clone(
                memory_format=torch.contiguous_format
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_sibling(path, "tmp")
    try:
        temp.mkdir()
        save_file(tensors, temp / WEIGHTS, metadata={"format": "pt"})
        (temp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        check_target(path, overwrite)
        move_into_place(temp, path)
    except BaseException:
        remove_temporary(temp)
        raise
    return path
