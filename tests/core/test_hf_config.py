import json
from pathlib import Path

import pytest

from bridgecore.errors import BridgeError
from bridgecore.hf.config import copy_side_files, read_config


def test_reads_config_without_running_remote_code(tmp_path: Path):
    config = {"architectures": ["Foo"], "auto_map": {"AutoConfig": "configuration_foo.FooConfig"}, "hidden_size": 8}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "configuration_foo.py").write_text("raise SystemExit('remote code ran')\n")
    assert read_config(tmp_path) == config


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "has no config.json"),
        ('{"a": 1,\n "b": }', "line 2 column"),
        ("[1, 2]", "top level is a JSON list; expected an object"),
        ('{"architectures": "Foo"}', "expected a list of strings"),
        ('{"architectures": ["Foo", 3]}', "expected a list of strings"),
    ],
)
def test_config_errors_are_one_line(tmp_path: Path, content: str | None, expected: str):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(BridgeError, match=expected) as err:
        read_config(tmp_path)
    assert "\n" not in str(err.value)


def test_missing_directory(tmp_path: Path):
    with pytest.raises(BridgeError, match="not a directory"):
        read_config(tmp_path / "nowhere")


def test_side_files_skip_code_and_weights(tmp_path: Path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    kept = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "chat_template.jinja",
        "preprocessor_config.json",
    ]
    dropped = ["modeling_foo.py", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
    for name in kept + dropped:
        (src / name).write_text(name)
    assert copy_side_files(src, dst) == sorted(kept)
    assert sorted(p.name for p in dst.iterdir()) == sorted(kept)
    assert (dst / "merges.txt").read_text() == "merges.txt"
