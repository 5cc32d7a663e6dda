"""Bit-exact comparison of two HF checkpoints, tensor by tensor (one tensor in memory at a time), and
the logits comparison of ``bridgecore verify``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bridgecore.hf.reader import CheckpointReader


@dataclass
class TensorResult:
    name: str
    status: str  # exact | values | dtype | shape | missing | extra
    detail: str = ""


@dataclass
class Report:
    rows: list[TensorResult] = field(default_factory=list)
    config_equal: bool = True

    @property
    def exact(self) -> bool:
        return self.config_equal and all(r.status == "exact" for r in self.rows)


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Compare storage bits, so NaN payloads and -0.0 count as what they are.
    return t.contiguous().reshape(-1).view(torch.uint8)


def compare_checkpoints(src: Path, dst: Path) -> Report:
    report = Report()
    report.config_equal = json.loads((src / "config.json").read_text()) == json.loads((dst / "config.json").read_text())
    with CheckpointReader(src) as a, CheckpointReader(dst) as b:
        theirs = set(b.keys())
        for name in a.keys():
            if name not in theirs:
                report.rows.append(TensorResult(name, "missing", "not in the output"))
                continue
            if a.dtype(name) != b.dtype(name):
                report.rows.append(TensorResult(name, "dtype", f"{a.dtype(name)} -> {b.dtype(name)}"))
            elif a.shape(name) != b.shape(name):
                report.rows.append(TensorResult(name, "shape", f"{list(a.shape(name))} -> {list(b.shape(name))}"))
            else:
                x, y = a.read(name, ()), b.read(name, ())
                same = torch.equal(_bits(x), _bits(y))
                detail = "" if same else f"max abs diff {(x.float() - y.float()).abs().max().item():.3e}"
                report.rows.append(TensorResult(name, "exact" if same else "values", detail))
        report.rows += [TensorResult(n, "extra", "only in the output") for n in b.keys() if n not in set(a.keys())]
    return report


def print_report(report: Report, verbose: bool = False) -> None:
    bad = [r for r in report.rows if r.status != "exact"]
    for r in report.rows if verbose else bad:
        print(f"  {r.status:8s} {r.name} {r.detail}")
    if not report.config_equal:
        print("  config.json differs")
    verdict = "bit-exact" if report.exact else f"{len(bad)} tensors differ"
    print(f"roundtrip: {len(report.rows) - len(bad)}/{len(report.rows)} tensors identical: {verdict}")


@dataclass(frozen=True)
class LogitsParity:
    """How far Megatron's logits are from the reference's, relative to the reference's scale."""

    max_abs_diff: float
    mean_abs_diff: float
    #: the largest |reference logit|: the scale the difference is measured against.
    scale: float
    #: ``max_abs_diff / scale``: what ``verify --rtol`` bounds.
    relative: float
    argmax_agreement: float

    @classmethod
    def of(cls, ours: torch.Tensor, reference: torch.Tensor) -> LogitsParity:
        diff = (ours.float() - reference.float()).abs()
        scale = reference.float().abs().max().item()
        return cls(
            max_abs_diff=diff.max().item(),
            mean_abs_diff=diff.mean().item(),
            scale=scale,
            relative=diff.max().item() / max(scale, torch.finfo(torch.float32).tiny),
            argmax_agreement=(ours.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        )

    def passes(self, rtol: float) -> bool:
        """Whether the difference is within ``rtol`` of the scale; a NaN difference never is."""
        return self.relative <= rtol


def nonfinite(logits: torch.Tensor, side: str) -> str | None:
    """Where ``side``'s logits are NaN or infinite, as one phrase, or None when all are finite."""
    bad = ~torch.isfinite(logits)
    if not bool(bad.any()):
        return None
    first = tuple(bad.nonzero()[0].tolist())
    return (
        f"the {side} logits hold {int(bad.sum())} non-finite values of {logits.numel()}"
        f" (the first, {logits[first].item()}, at index {list(first)})"
    )
