"""The version of the bridgecore distribution (also in core/pyproject.toml)."""

__version__ = "0.2.0"
