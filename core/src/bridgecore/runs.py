"""One command's run, as the CLI frames it: set up before a converting command, and leave (or drop) its
process group after it. Light to import: it loads megatron-core only inside :func:`start_run`, which
must come before anything else imports it (see :func:`bridgecore.megatron.compat.import_megatron_core`).
"""

from __future__ import annotations

import gc


def start_run() -> None:
    """Before a converting command: megatron-core imported (or one line on why it cannot be), and the
    objects it and torch leave frozen out of Python's collections (7-9% of a conversion's CPU went
    to walking them; they live until exit anyway)."""
    # here, not at the top: importing megatron-core before import_megatron_core() sets up its
    # deferred compile would load torch's dynamo and inductor (about 800 modules) for nothing
    from bridgecore.megatron.compat import import_megatron_core

    import_megatron_core()
    gc.freeze()


def end_run() -> None:
    """After a command succeeded: leave its process group (with the final barrier)."""
    from bridgecore.megatron import parallel

    parallel.leave()


def abandon_run() -> str | None:
    """After a command failed: drop its process group without the final barrier (the other ranks may be
    gone); returns the first error any rank published, if one did."""
    from bridgecore.megatron import parallel

    found = parallel.first_error()
    parallel.forget()
    return found
