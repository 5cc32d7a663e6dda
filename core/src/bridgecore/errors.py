"""The one exception type users see: a single line naming what was found, where, and what was expected."""


class BridgeError(Exception):
    """A conversion problem the user can act on. `str(err)` is one line; the CLI prints only that."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
