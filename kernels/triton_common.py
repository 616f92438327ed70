"""Helpers shared by the Triton kernels: the matrix product they all use, and host-side
facts about where they run (interpreter or GPU, how many SMs)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def mm(a, b, DOT_FP32: tl.constexpr):
    """a @ b with float32 accumulation: float32 operands in full precision, else as given."""
    if DOT_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


def interpreted() -> bool:
    """Whether Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2(n: int, minimum: int = 16) -> int:
    """The next power of two >= n (and >= minimum): a block size Triton accepts."""
    return max(minimum, 1 << (max(1, n) - 1).bit_length())


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (asked once per device)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]
