"""Progress fits where stderr goes: a bar on a terminal, a few plain lines in a log."""

from __future__ import annotations

import io
import threading

import pytest

from bridgecore.progress import Progress, track


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def long_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Work that has run long enough for plain lines (they start after PLAIN_AFTER seconds)."""
    monkeypatch.setattr("bridgecore.progress.PLAIN_AFTER", 0.0)


def test_plain_lines_in_a_log(monkeypatch: pytest.MonkeyPatch, long_work: None) -> None:
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    assert list(track(range(81), "import", "tensor")) == list(range(81))
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 4
    assert lines[0].startswith("import: 21/81 tensors (25%) in ") and lines[-1].startswith(
        "import: 81/81 tensors (100%)"
    )


def test_quick_work_prints_no_plain_line(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    assert list(track(range(81), "import", "tensor")) == list(range(81))
    assert log.getvalue() == ""


def test_updates_from_threads_are_all_counted(monkeypatch: pytest.MonkeyPatch, long_work: None) -> None:
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    with Progress("offline import", 400, "chunk") as progress:
        workers = [threading.Thread(target=lambda: [progress.update() for _ in range(100)]) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert log.getvalue().splitlines()[-1].startswith("offline import: 400/400 chunks (100%)")


def test_a_bar_on_a_terminal_and_nothing_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    list(track(range(5), "export", "tensor"))
    assert "\r" in terminal.getvalue() and "export" in terminal.getvalue()
    other_rank = Terminal()
    monkeypatch.setattr("sys.stderr", other_rank)
    list(track(range(5), "export", "tensor", enabled=False))
    assert other_rank.getvalue() == ""
