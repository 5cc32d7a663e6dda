"""``verify``'s tolerance is relative to the logits' scale: the same rounding passes at any scale."""

from __future__ import annotations

import torch
from cli_runner import run_cli

from bridgecore.compare import LogitsParity


def _logits(scale: float) -> torch.Tensor:
    reference = torch.randn(1, 16, 128, generator=torch.Generator().manual_seed(0))
    return reference / reference.abs().max() * scale


def test_a_correct_conversion_with_large_logits_passes() -> None:
    """The case an absolute 1e-4 failed: logits reaching 53, off by 1.25e-4 (fp32 rounding)."""
    reference = _logits(53.0)
    ours = reference.clone()
    ours[0, 3, 7] += 1.25e-4
    parity = LogitsParity.of(ours, reference)
    assert abs(parity.scale - 53.0) < 1e-4 and abs(parity.max_abs_diff - 1.25e-4) < 1e-5
    assert parity.relative < 3e-6 < 1e-4 and parity.argmax_agreement == 1.0


def test_a_wrong_conversion_fails_at_any_scale() -> None:
    for scale in (0.05, 1.0, 53.0):
        reference = _logits(scale)
        ours = reference.roll(1, dims=-1)
        assert LogitsParity.of(ours, reference).relative > 1e-2


def test_help_states_the_tolerance() -> None:
    out = " ".join(run_cli("verify", "--help").stdout.split())
    assert "--rtol" in out and "largest |reference logit|" in out and "exit status 2" in out
