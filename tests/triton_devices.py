"""Devices the Triton kernel tests run on: CPU under the interpreter, CUDA when present.

Triton runs on CPU tensors only under TRITON_INTERPRET=1 (tests/conftest.py sets it
when there is no GPU); on a GPU machine without it the tests run on CUDA.
"""
import os

import pytest
import torch


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


HAS_CUDA = torch.cuda.is_available() and not interpreted()

DEVICES = [
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(
        not interpreted(), reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1")),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        not HAS_CUDA, reason="no CUDA device (or the Triton interpreter is on)")),
]
