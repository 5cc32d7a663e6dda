"""Progress of a long step, fitted to where stderr goes: a tqdm bar on a terminal, otherwise a few
plain lines (at each quarter of the work, and at least once a minute), which read well in a log file.
Work done within its first few seconds prints no plain line at all: a log needs no progress of a tiny model."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

#: plain lines: one per 1/PLAIN_STEPS of the work, and one at least this often (seconds) while it advances.
PLAIN_STEPS = 4
PLAIN_EVERY = 60.0
#: plain lines begin only once the work has run this long (seconds).
PLAIN_AFTER = 3.0


class Progress:
    """Counts ``total`` units of work done (from any thread) and shows it on stderr."""

    def __init__(self, desc: str, total: int, unit: str, enabled: bool = True):
        self.desc, self.total, self.unit = desc, total, unit
        self.enabled = enabled and total > 0
        self._bar: Any = None
        self._lock = threading.Lock()
        self._done = 0
        self._shown_step = 0
        self._start = self._last = time.monotonic()
        if self.enabled and _is_terminal(sys.stderr):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        with self._lock:
            self._done += n
            step = self._done * PLAIN_STEPS // self.total
            now = time.monotonic()
            if now - self._start < PLAIN_AFTER:
                return
            if step > self._shown_step or now - self._last >= PLAIN_EVERY:
                self._shown_step, self._last = step, now
                percent = self._done * 100 // self.total
                print(
                    f"{self.desc}: {self._done}/{self.total} {self.unit}s ({percent}%) in {now - self._start:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], desc: str, unit: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """``items``, showing progress as each one is done (when the caller asks for the next)."""
    if total is None:
        total = len(items)  # type: ignore[arg-type]
    with Progress(desc, total, unit, enabled) as progress:
        for item in items:
            yield item
            progress.update()


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
