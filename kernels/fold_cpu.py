"""A window fold's passes over the old text records, compiled (`fold_cpu.cpp`), in place.

`text_energies` gives each folding request's old text factors' column energies (all a fold
needs of them: their Gram matrix is diagonal, see `factorize.fold_batch_diagonal`);
`rotate_text_records` then rotates every old text record into the new basis, re-quantised
(int8) or rounded (16-bit) as `kernels/storage.py` writes records. Both read the records
through the fold's flat page slots where they are stored: no [requests, tokens, width]
copy, no float64 copy of the factors. Image records, importance and flags are untouched.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import cpu_library
from .cpu_library import STORAGE_CODES, pointer as _ptr
from .layout import RecordLayout

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class _FoldArgs(ctypes.Structure):
    """Mirror of `FoldArgs` in fold_cpu.cpp (same fields, same order)."""

    _fields_ = [(name, _I64) for name in ("folds", "rank_k", "rank_v", "storage", "num_threads")] + [
        ("record_slots", _P), ("record_slots_stride", _I64), ("compressed_lens", _P),
        ("pages", _P), ("width", _I64), ("k_offset", _I64), ("v_offset", _I64), ("k_scale_offset", _I64),
        ("v_scale_offset", _I64), ("flags_offset", _I64),
        ("energies_k", _P), ("energies_v", _P), ("rotation_k", _P), ("rotation_v", _P),
    ]


@functools.lru_cache(maxsize=2)
def _kernel(name: str):
    return cpu_library.bind(name, _FoldArgs, "attentionpack_fold_args_size")


def supports(pages: torch.Tensor) -> bool:
    """Whether these pages can be folded here: on the CPU, in a stored format the kernels
    take, with the library built."""
    return (pages.device.type == "cpu" and pages.dtype in STORAGE_CODES and pages.is_contiguous()
            and cpu_library.available())


def _args(pages: torch.Tensor, record_slots: torch.Tensor, compressed_lens: torch.Tensor, layout: RecordLayout,
          rank_k: int, rank_v: int, **pointers) -> _FoldArgs:
    if pages.stride(-1) != 1 or not pages.is_contiguous():
        raise ValueError("pages: the CPU fold kernels need contiguous pages")
    if (record_slots.dtype != torch.int64 or compressed_lens.dtype != torch.int64
            or record_slots.stride(-1) != 1 or not compressed_lens.is_contiguous()):
        raise ValueError("record_slots and compressed_lens must be int64, unit stride last")
    return _FoldArgs(
        folds=record_slots.shape[0], rank_k=rank_k, rank_v=rank_v, storage=STORAGE_CODES[pages.dtype],
        num_threads=torch.get_num_threads(), record_slots=_ptr(record_slots),
        record_slots_stride=record_slots.stride(0), compressed_lens=_ptr(compressed_lens),
        pages=_ptr(pages), width=layout.width, k_offset=layout.k_offset, v_offset=layout.v_offset,
        k_scale_offset=layout.k_scale_offset if layout.int8 else 0,
        v_scale_offset=layout.v_scale_offset if layout.int8 else 0, flags_offset=layout.flags_offset,
        **{name: _ptr(t) for name, t in pointers.items()})


def text_energies(pages: torch.Tensor, record_slots: torch.Tensor, compressed_lens: torch.Tensor,
                  layout: RecordLayout, rank_k: int, rank_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([F, rank_k], [F, rank_v]) float64: sum over each request's old text records
    (positions [0, compressed_lens[f]) at `record_slots[f]`) of their K' and V' squared,
    the first `rank_k` and `rank_v` columns."""
    folds = record_slots.shape[0]
    energies_k = torch.empty(folds, rank_k, dtype=torch.float64)
    energies_v = torch.empty(folds, rank_v, dtype=torch.float64)
    args = _args(pages, record_slots, compressed_lens, layout, rank_k, rank_v,
                 energies_k=energies_k, energies_v=energies_v)
    if _kernel("attentionpack_text_energies")(ctypes.byref(args)) != 0:
        raise ValueError(f"the CPU fold kernel refused pages of {pages.dtype}")
    return energies_k, energies_v


def rotate_text_records(pages: torch.Tensor, record_slots: torch.Tensor, compressed_lens: torch.Tensor,
                        layout: RecordLayout, rotation_k: torch.Tensor, rotation_v: torch.Tensor) -> None:
    """K' <- K' @ rotation_k[f] and V' <- V' @ rotation_v[f] ([F, r, r] float32, r the text
    ranks: the first r columns) for each request's old text records, in place."""
    rotation_k, rotation_v = rotation_k.float().contiguous(), rotation_v.float().contiguous()
    args = _args(pages, record_slots, compressed_lens, layout, rotation_k.shape[-1], rotation_v.shape[-1],
                 rotation_k=rotation_k, rotation_v=rotation_v)
    if _kernel("attentionpack_rotate_text_records")(ctypes.byref(args)) != 0:
        raise ValueError(f"the CPU fold kernel refused pages of {pages.dtype}")
