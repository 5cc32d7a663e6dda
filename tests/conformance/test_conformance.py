"""Checkpoints as transformers writes them (issue 14): every one converts bit-exactly both ways, at
one layout and back at another, offline as in memory, and its Megatron logits match the transformers
model that wrote it.

The default run converts every variant at one rank (in-memory and offline paths) and one
representative multi-rank case per kind; ``-m slow`` runs TP2, EP2 and import-at-one-layout,
export-at-another for every variant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from cli_runner import run_cli
from hf_models import VARIANTS

from bridgecore.compare import compare_checkpoints

#: Megatron's and transformers' fp32 logits (|logits| up to about 5) may differ by this fraction of
#: the largest |logit|: two implementations of the same math summing in different orders. Measured:
#: at most 1.8e-5 over every variant and layout.
RTOL = 1e-4

BY_NAME = {v.name: v for v in VARIANTS}
NAMES = list(BY_NAME)
#: configs that declare an MTP layer whose tensors transformers' save_pretrained left out.
MTP_ABSENT = [n for n in NAMES if "+mtp" not in n]


def _exact(source: Path, out: Path) -> None:
    error = out.parent / "error.txt"
    assert not error.exists(), error.read_text()[-3000:]
    report = compare_checkpoints(source, out)
    assert report.config_equal, "config.json differs"
    assert report.exact, [r for r in report.rows if r.status != "exact"][:5]


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
    scale = theirs.abs().max().item()
    diff = (ours - theirs).abs().max().item()
    assert diff <= RTOL * scale, f"max abs diff {diff:.3e} > {RTOL:g} x max |logit| {scale:.3f}"


@pytest.fixture(scope="module")
def one_rank(checkpoints: dict[str, Path], run_jobs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every variant at TP1 (logits, the plugin's reference, round trip) and through the offline paths."""
    out = tmp_path_factory.mktemp("one-rank")
    jobs: list[dict[str, Any]] = []
    for v in VARIANTS:
        src = checkpoints[v.name]
        jobs.append(dict(kind="memory", src=src, out=out / v.name / "tp1", tp=1, ep=1, reference=True))
        jobs.append(dict(kind="offline", src=src, out=out / v.name / "offline", tp=2, ep=2 if v.moe else 1))
    run_jobs(jobs, 1)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_is_bit_exact(one_rank: Path, checkpoints: dict[str, Path], name: str) -> None:
    _exact(checkpoints[name], one_rank / name / "tp1" / "hf")


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_the_model_that_wrote_the_checkpoint(
    one_rank: Path, checkpoints: dict[str, Path], name: str
) -> None:
    theirs = torch.load(checkpoints[name].with_name(f"{name}.logits.pt"))
    _close(torch.load(one_rank / name / "tp1" / "logits.pt"), theirs)
    # what `bridgecore verify` compares against: the plugin's reference, read from the files
    _close(torch.load(one_rank / name / "tp1" / "reference.pt"), theirs)


@pytest.mark.parametrize("name", NAMES)
def test_mtp_is_left_out_only_when_absent(one_rank: Path, name: str) -> None:
    notes = (one_rank / name / "tp1" / "notes.txt").read_text().splitlines()
    assert len(notes) == (name in MTP_ABSENT), notes
    assert all("converting without MTP" in n for n in notes)


@pytest.mark.parametrize("name", NAMES)
def test_offline_paths_match_the_in_memory_ones(one_rank: Path, checkpoints: dict[str, Path], name: str) -> None:
    out = one_rank / name / "offline"
    for export in ("hf-offline", "hf-offline-of-memory", "hf-memory-of-offline"):
        _exact(checkpoints[name], out / export)


def test_cli_says_mtp_is_left_out_in_one_note(checkpoints: dict[str, Path]) -> None:
    """`roundtrip` of a checkpoint whose config declares MTP that save_pretrained dropped: one note, exact."""
    done = run_cli("roundtrip", str(checkpoints["qwen35-moe"]))
    assert done.returncode == 0, done.stderr[-2000:]
    notes = [line for line in done.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "1 MTP layer" in notes[0] and "converting without MTP" in notes[0], done.stdout
    assert "bit-exact" in done.stdout


# -- several ranks -----------------------------------------------------------------------------------
def _layouts(name: str) -> list[tuple[str, dict[str, int]]]:
    """(kind, layout) of the multi-rank matrix for one variant."""
    cases = [("memory", dict(tp=2, ep=1))]
    if BY_NAME[name].moe:
        cases += [("memory", dict(tp=1, ep=2)), ("cross", dict(tp=2, ep=1, to_tp=1, to_ep=2))]
    else:
        cases += [("cross", dict(tp=2, ep=1, to_tp=1, to_ep=1))]
    return cases


DEFAULT = {
    ("step37", "memory", (2, 1)),
    ("qwen35-moe-vl-packed-tied+mtp", "memory", (1, 2)),
    ("qwen35-moe-vl-packed-tied+mtp", "cross", (2, 1)),
}
MATRIX = [
    (name, kind, layout, (name, kind, (layout["tp"], layout["ep"])) in DEFAULT)
    for name in NAMES
    for kind, layout in _layouts(name)
]


def _case_dir(root: Path, name: str, kind: str, layout: dict[str, int]) -> Path:
    return root / name / f"{kind}-{'-'.join(f'{k}{v}' for k, v in layout.items())}"


@pytest.fixture(scope="module")
def several_ranks(checkpoints: dict[str, Path], run_jobs, tmp_path_factory: pytest.TempPathFactory):
    """``several_ranks(default)``: the root of the 2-rank run of the default cases, or of all the others."""
    runs: dict[bool, Path] = {}

    def get(default: bool) -> Path:
        if default not in runs:
            root = tmp_path_factory.mktemp("default" if default else "slow")
            jobs = [
                dict(kind=kind, src=checkpoints[name], out=_case_dir(root, name, kind, layout), **layout)
                for name, kind, layout, is_default in MATRIX
                if is_default == default
            ]
            run_jobs(jobs, 2)
            runs[default] = root
        return runs[default]

    return get


@pytest.mark.parametrize(
    ("name", "kind", "layout", "default"),
    [
        pytest.param(*case, marks=() if case[3] else pytest.mark.slow, id=f"{case[0]}-{case[1]}-{case[2]}")
        for case in MATRIX
    ],
)
def test_several_ranks(
    several_ranks, checkpoints: dict[str, Path], name: str, kind: str, layout: dict[str, int], default: bool
) -> None:
    """TP2 / EP2: Megatron logits match the writing model and the export is exact; "cross": imported at
    one layout, exported at another, bit for bit."""
    out = _case_dir(several_ranks(default), name, kind, layout)
    _exact(checkpoints[name], out / "hf")
    if kind == "memory":
        _close(torch.load(out / "logits.pt"), torch.load(checkpoints[name].with_name(f"{name}.logits.pt")))


@pytest.mark.parametrize("name", [n for n in NAMES if "+mtp" in n])
def test_every_mtp_tensor_of_a_shape_holds_its_own_values(checkpoints: dict[str, Path], name: str) -> None:
    """A mapping that swaps two MTP tensors of one shape (enorm and hnorm, the shared head's norm) must
    change the checkpoint's values: no two of them may be equal. Qwen3.5 keeps MTP under ``mtp.``,
    Step under the layer numbers after the decoder's."""
    import json

    from safetensors import safe_open

    config = json.loads((checkpoints[name] / "config.json").read_text())
    decoder = config.get("text_config", config)["num_hidden_layers"]
    mtp = {}
    for file in sorted(checkpoints[name].glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            mtp |= {k: f.get_tensor(k) for k in f.keys() if k.startswith("mtp.") or f"layers.{decoder}." in k}
    assert len(mtp) >= 3, name
    names = sorted(mtp)
    same = [
        (a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if mtp[a].shape == mtp[b].shape and torch.equal(mtp[a], mtp[b])
    ]
    assert same == []
