"""The verifiers must fail when they should: each is given cases it has to reject, and the rejection is
asserted. A check that only ever sees passing cases cannot tell a working verifier from one that
compares nothing."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bridgecore.casting import exact_cast
from bridgecore.compare import LogitsParity, compare_checkpoints, nonfinite, print_report
from bridgecore.errors import BridgeError
from bridgecore.megatron.dcp import MetadataUnpickler

BASE = {
    "a": torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16),
    "b": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "c": torch.tensor([0.0, 1.0], dtype=torch.float32),
}


def _write(path: Path, tensors: dict[str, torch.Tensor], config: str = '{"architectures": ["X"]}') -> Path:
    path.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(config)
    return path


def _report(tmp_path: Path, changed: dict[str, torch.Tensor], drop: tuple[str, ...] = (), **kwargs: str):
    src = _write(tmp_path / "src", BASE)
    dst = _write(tmp_path / "dst", {k: v for k, v in {**BASE, **changed}.items() if k not in drop}, **kwargs)
    return compare_checkpoints(src, dst)


def _statuses(report) -> dict[str, str]:
    return {row.name: row.status for row in report.rows}


def test_identical_checkpoints_are_exact(tmp_path: Path) -> None:
    report = _report(tmp_path, {})
    assert report.exact and _statuses(report) == {"a": "exact", "b": "exact", "c": "exact"}


@pytest.mark.parametrize(
    ("changed", "status"),
    [
        (
            {"b": BASE["b"].clone().index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(5.0000005))},
            "values",
        ),
        ({"a": BASE["a"].float()}, "dtype"),  # the same values in another dtype
        ({"b": BASE["b"].reshape(3, 2)}, "shape"),
        ({"c": torch.tensor([-0.0, 1.0])}, "values"),  # -0.0 == 0.0 as numbers, not as bits
        ({"b": BASE["b"].clone().view(-1).index_put_((torch.tensor([0]),), torch.tensor(1e-45)).view(2, 3)}, "values"),
    ],
    ids=["one-ulp", "dtype-only", "shape-only", "negative-zero", "denormal"],
)
def test_a_changed_tensor_is_reported(tmp_path: Path, changed: dict[str, torch.Tensor], status: str) -> None:
    report = _report(tmp_path, changed)
    name = next(iter(changed))
    assert not report.exact and _statuses(report)[name] == status
    assert all(s == "exact" for n, s in _statuses(report).items() if n != name)


def test_nan_payloads_are_compared_as_bits(tmp_path: Path) -> None:
    quiet = torch.tensor([float("nan")], dtype=torch.float32)
    other = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)  # another NaN payload
    src = _write(tmp_path / "src", {"n": quiet})
    assert compare_checkpoints(src, _write(tmp_path / "same", {"n": quiet.clone()})).exact
    assert not compare_checkpoints(src, _write(tmp_path / "other", {"n": other})).exact


def test_missing_extra_and_config_are_reported(tmp_path: Path) -> None:
    report = _report(tmp_path, {"d": torch.zeros(1)}, drop=("a",))
    assert _statuses(report) == {"a": "missing", "b": "exact", "c": "exact", "d": "extra"} and not report.exact
    changed_config = compare_checkpoints(
        _write(tmp_path / "x", BASE), _write(tmp_path / "y", BASE, config='{"architectures": ["Y"]}')
    )
    assert not changed_config.config_equal and not changed_config.exact


def test_every_row_says_what_differs_and_the_report_prints_it(tmp_path: Path, capsys) -> None:
    changed = {"b": BASE["b"].reshape(3, 2), "c": torch.tensor([0.0, 1.5]), "d": torch.zeros(1)}
    report = _report(tmp_path, changed, drop=("a",), config='{"architectures": ["Y"]}')
    # in the source's order (safetensors puts wider dtypes first), then what only the output has
    rows = [(r.name, r.status, r.detail) for r in report.rows]
    assert rows == [
        ("b", "shape", "[2, 3] -> [3, 2]"),
        ("c", "values", "max abs diff 5.000e-01"),
        ("a", "missing", "not in the output"),
        ("d", "extra", "only in the output"),
    ]
    print_report(report)
    assert capsys.readouterr().out.splitlines() == [
        "  shape    b [2, 3] -> [3, 2]",
        "  values   c max abs diff 5.000e-01",
        "  missing  a not in the output",
        "  extra    d only in the output",
        "  config.json differs",
        "roundtrip: 0/4 tensors identical: 4 tensors differ",
    ]
    (tmp_path / "dtype").mkdir()
    dtype = _report(tmp_path / "dtype", {"a": BASE["a"].float()})
    assert [(r.status, r.detail) for r in dtype.rows if r.name == "a"] == [("dtype", "torch.bfloat16 -> torch.float32")]
    print_report(dtype, verbose=True)
    assert capsys.readouterr().out.splitlines() == [
        "  exact    b ",
        "  exact    c ",
        "  dtype    a torch.bfloat16 -> torch.float32",
        "roundtrip: 2/3 tensors identical: 1 tensors differ",
    ]
    # a missing tensor first in the order: the ones after it are still compared
    (tmp_path / "first").mkdir()
    first = _report(tmp_path / "first", {"c": torch.tensor([0.0, 2.0])}, drop=("b",))
    assert _statuses(first) == {"b": "missing", "c": "values", "a": "exact"}
    (tmp_path / "same").mkdir()
    same = _report(tmp_path / "same", {})
    print_report(same)
    assert capsys.readouterr().out == "roundtrip: 3/3 tensors identical: bit-exact\n"


def test_roundtrip_fails_when_the_export_differs(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command, not only the function: a writer that changes one value makes roundtrip exit 1
    naming that tensor."""
    from bridgecore.cli import main
    from bridgecore.hf.writer import ShardedWriter

    write = ShardedWriter.write

    def off_by_one_ulp(self: ShardedWriter, name: str, tensor: torch.Tensor, expert: int | None = None) -> None:
        if name == "model.norm.weight":
            tensor = torch.nextafter(tensor, torch.full_like(tensor, float("inf")))
        write(self, name, tensor, expert)

    monkeypatch.setattr(ShardedWriter, "write", off_by_one_ulp)
    monkeypatch.setenv("BRIDGECORE_PLUGINS", "llama_example")
    from bridgecore.plugins import installed

    installed.cache_clear()
    try:
        assert main(["roundtrip", str(llama_dir)]) == 1
    finally:
        installed.cache_clear()
    out = capsys.readouterr().out
    assert "values   model.norm.weight" in out and "1 tensors differ" in out


def test_exact_cast_rejects_a_lossy_cast_and_keeps_nan_and_negative_zero() -> None:
    """torch casts every float32 NaN to the bfloat16 0xFFFF: a bfloat16 checkpoint's NaN came back
    from float32 params with another sign and payload, and the cast check, comparing NaN as equal to
    NaN, let it through."""
    with pytest.raises(BridgeError, match="w: casting torch.float32 to torch.bfloat16 would change values"):
        exact_cast(torch.tensor([1.0 + 2**-10]), torch.bfloat16, "w")
    special = torch.tensor([float("nan"), -0.0, float("inf"), float("-inf"), 1.5], dtype=torch.bfloat16)
    back = exact_cast(exact_cast(special, torch.float32, "w"), torch.bfloat16, "w")
    assert torch.equal(back.view(torch.int16), special.view(torch.int16))
    payload = torch.tensor([0x7FC1, -0x3F, 0x7F81], dtype=torch.int16).view(torch.bfloat16)  # three NaNs
    back = exact_cast(exact_cast(payload, torch.float32, "w"), torch.bfloat16, "w")
    assert torch.equal(back.view(torch.int16), payload.view(torch.int16))
    with pytest.raises(BridgeError, match="would change values"):
        exact_cast(torch.tensor([3.5]), torch.int32, "w")
    with pytest.raises(BridgeError, match="would change values"):  # a float16 NaN payload float32 cannot keep
        exact_cast(torch.tensor([0x7C01], dtype=torch.int16).view(torch.float16), torch.bfloat16, "w")


@pytest.mark.parametrize(
    ("ours", "reference", "passes"),
    [
        (torch.ones(4), torch.ones(4), True),
        (torch.ones(4) + 1e-3, torch.ones(4), False),  # 1e-3 of a scale of 1: an absolute 1e-4 check would pass 1e-5
        (torch.tensor([1.0, float("nan"), 1.0, 1.0]), torch.ones(4), False),
        (torch.ones(4), torch.tensor([1.0, 1.0, float("inf"), 1.0]), False),
    ],
    ids=["equal", "relative", "nan-ours", "inf-reference"],
)
def test_logits_parity_rejects_what_it_must(ours: torch.Tensor, reference: torch.Tensor, passes: bool) -> None:
    assert LogitsParity.of(ours, reference).passes(1e-4) is passes


def test_logits_parity_is_relative_to_the_largest_reference_logit() -> None:
    reference = torch.tensor([100.0, -3.0, 0.5])
    assert LogitsParity.of(reference + 1e-3, reference).passes(1e-4)  # 1e-5 of 100
    assert not LogitsParity.of(reference / 100 + 1e-3, reference / 100).passes(1e-4)  # 1e-3 of 1


def test_logits_parity_reports_every_figure_and_passes_at_its_bound() -> None:
    reference = torch.tensor([[[4.0, -8.0, 1.0], [0.0, 2.0, 1.0]]])
    ours = torch.tensor([[[4.0, -7.0, 1.0], [0.0, 2.0, 3.0]]])  # diffs 1 and 2; the argmax moves in row 2
    parity = LogitsParity.of(ours, reference)
    assert (parity.max_abs_diff, parity.mean_abs_diff, parity.scale, parity.relative) == (2.0, 0.5, 8.0, 0.25)
    assert parity.argmax_agreement == 0.5
    assert parity.passes(0.25) and not parity.passes(0.2499)
    zero = LogitsParity.of(torch.zeros(2), torch.zeros(2))
    assert (zero.relative, zero.passes(0.0)) == (0.0, True)


def test_nonfinite_names_side_count_and_first_index() -> None:
    logits = torch.zeros(1, 3, 4)
    assert nonfinite(logits, "Megatron") is None
    logits[0, 2, 1] = float("-inf")
    logits[0, 2, 3] = float("nan")
    assert nonfinite(logits, "Megatron") == (
        "the Megatron logits hold 2 non-finite values of 12 (the first, -inf, at index [0, 2, 1])"
    )


def _pickled_global(module: str, name: str) -> bytes:
    # protocol 2 with an explicit GLOBAL opcode: c<module>\n<name>\n then call with no args
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n)R."


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("os", "system"),
        ("torch", "load"),
        ("torch.serialization", "load"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch.distributed.checkpoint.filesystem", "FileSystemReader"),
        ("builtins", "eval"),
    ],
)
def test_metadata_unpickler_refuses_globals_outside_its_allowlist(module: str, name: str) -> None:
    with pytest.raises(pickle.UnpicklingError, match=f"refers to {module}.{name}"):
        MetadataUnpickler(io.BytesIO(_pickled_global(module, name))).load()


def test_metadata_unpickler_accepts_what_a_real_metadata_holds(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from bridgecore.megatron.save import file_writer

    dcp.save({"w": torch.ones(2, dtype=torch.bfloat16)}, storage_writer=file_writer(tmp_path), no_dist=True)
    with open(tmp_path / ".metadata", "rb") as file:
        metadata = MetadataUnpickler(file).load()
    assert "w" in metadata.state_dict_metadata
