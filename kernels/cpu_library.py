"""The compiled CPU kernels: built from their C++ sources with the system's g++, loaded with ctypes.

Sources: `latent_decode_cpu.cpp` (the decode step's attention) and `fold_cpu.cpp` (a
window fold's passes over the old records), sharing `cpu_common.h`. They are plain C++
(no PyTorch headers), built on first use into one library in a cache folder
(`ATTENTIONPACK_CACHE`, else `$XDG_CACHE_HOME/attentionpack_vllm`, else
`~/.cache/attentionpack_vllm`) under a name that hashes the sources, the compiler, the
flags and the CPU, so an edit or another machine builds afresh. Without a compiler
`available()` is False and `unavailable_reason()` says why; callers then take their
PyTorch paths.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = (HERE / "latent_decode_cpu.cpp", HERE / "fold_cpu.cpp")
HEADERS = (HERE / "cpu_common.h",)
# -ffast-math lets the reductions and exp vectorise (the int8 quantisation opts out, so that
# its rounding equals storage.quantize bit for bit). Linked without -ffast-math, so the
# library does not switch the process to flush-to-zero.
COMPILE_FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-fopenmp", "-ffast-math")
LINK_FLAGS = ("-shared", "-fopenmp")
# Storage formats the kernels read and write (`storage` fields of their argument structures).
STORAGE_CODES = {torch.int8: 0, torch.float32: 1, torch.bfloat16: 2}
BUILD_TIMEOUT_S = 300  # a compiler that hangs must not hang the engine's startup


class CpuKernelUnavailable(RuntimeError):
    """The CPU kernel library could not be built or loaded here."""


def cache_dir() -> Path:
    root = os.environ.get("ATTENTIONPACK_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attentionpack_vllm"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    raise CpuKernelUnavailable("no C++ compiler found (set CXX, or install g++)")


def build() -> Path:
    """The compiled library's path, building it first if the cache lacks it."""
    compiler = _compiler()
    try:
        return _build(compiler)
    except OSError as err:  # an unwritable cache folder, a compiler that cannot start
        raise CpuKernelUnavailable(f"building the CPU kernels failed: {err}") from err


def _build(compiler: str) -> Path:
    texts = [path.read_text() for path in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*texts, compiler, *COMPILE_FLAGS, *LINK_FLAGS, platform.machine(),
                                    _cpu_model()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"attentionpack_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = [Path(tmp) / f"{source.stem}.o" for source in SOURCES]
        library = Path(tmp) / "library.so"
        commands = [[compiler, *COMPILE_FLAGS, "-c", str(source), "-o", str(obj)]
                    for source, obj in zip(SOURCES, objects)]
        commands.append([compiler, *LINK_FLAGS, *map(str, objects), "-o", str(library)])
        for command in commands:
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            except subprocess.TimeoutExpired as err:
                raise CpuKernelUnavailable(f"building the CPU kernels took over {BUILD_TIMEOUT_S} s: "
                                           f"{' '.join(command)}") from err
            if done.returncode != 0:
                raise CpuKernelUnavailable(f"building the CPU kernels failed: {' '.join(command)}\n"
                                           f"{done.stderr[-2000:]}")
        os.replace(library, target)  # atomic: processes building at once each install a whole file
    return target


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """(the library, None), or (None, why not): tried once per process, so that every
    availability check after a failed build does not run the compiler again."""
    try:
        path = build()
        return ctypes.CDLL(str(path)), None
    except CpuKernelUnavailable as err:
        return None, str(err)
    except OSError as err:
        return None, f"loading the CPU kernels failed: {err}"


def library() -> ctypes.CDLL:
    """The loaded library (built first if needed); raises CpuKernelUnavailable."""
    lib, reason = _load()
    if lib is None:
        raise CpuKernelUnavailable(reason)
    return lib


def bind(name: str, args_type: type[ctypes.Structure], size_name: str):
    """The library's function `name`, taking a pointer to `args_type`; checks that the C++
    structure behind it (its size from `size_name`) matches the Python mirror."""
    lib = library()
    size = getattr(lib, size_name)
    size.restype = ctypes.c_int64
    if size() != ctypes.sizeof(args_type):
        raise CpuKernelUnavailable(f"{args_type.__name__} differs from its C++ structure")
    fn = getattr(lib, name)
    fn.argtypes = [ctypes.POINTER(args_type)]
    fn.restype = ctypes.c_int
    return fn


def unavailable_reason() -> str | None:
    """None when the library builds and loads, else why not."""
    return _load()[1]


def available() -> bool:
    return unavailable_reason() is None


def pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
