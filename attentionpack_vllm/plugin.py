"""vLLM general-plugin entry point.

vLLM calls `register()` in every process (API server, engine core, workers), so it
must be idempotent, cheap, and import nothing heavy at module import time.
"""


def register() -> None:
    """Register the AttentionPack attention backend with vLLM (idempotent)."""
