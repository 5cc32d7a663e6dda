"""bridgecore: exact, streaming checkpoint conversion between Hugging Face and Megatron-Core."""

__version__ = "0.1.0"
