"""The reliability suite: the `soak` marker and the in-process CLI fixture."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

import pytest
from reliability_support import EXAMPLE, Result, plugins_only


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: long repeated round trips (minutes); run with -m soak")


@pytest.fixture
def cli() -> Callable[..., Result]:
    """`bridgecore ARGS` in this process: the same `main()` the console script runs, minus the start-up."""

    def run(*args: object, plugins: str = EXAMPLE) -> Result:
        from bridgecore.cli import main

        out, err = io.StringIO(), io.StringIO()
        with plugins_only(plugins), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
        return Result(code, out.getvalue(), err.getvalue())

    return run
