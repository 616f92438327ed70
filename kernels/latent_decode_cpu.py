"""Latent-space decode attention on CPU as one compiled call per layer.

`latent_decode_attention_cpu` has the contract of `latent_decode_torch.latent_decode_attention`
(the reference the tests hold it to) and can also append the step's new token to the
window in the same call (`new_keys`, `new_values`; the function's `fuses_window_append`).
The work is in `latent_decode_cpu.cpp` (built by `cpu_library`): each request (or, when
there are too few for the threads, each (request, KV head) pair) reads its records once
through the block table and its bases and window rows through the slot-row maps,
where they are stored, and runs the whole attention in float32 without a gathered copy
or a chain of PyTorch ops. The PyTorch path takes about 50 ops per layer and call; this
takes one, plus the output's dtype conversion.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import cpu_library
from .cpu_library import STORAGE_CODES, pointer as _ptr
from .decode_inputs import DecodeBatch, LatentSpec
from .slot_rows import MAP_NAMES, SlotRows

_P, _I64, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double


class _Args(ctypes.Structure):
    """Mirror of `Args` in latent_decode_cpu.cpp (same fields, same order)."""

    _fields_ = [(name, _I64) for name in ("batch", "num_heads", "kv_heads", "head_size", "num_planes",
                                          "rank_k", "rank_v", "storage", "window_size", "num_threads")] + [
        ("scale", _F64),
        ("block_table", _P), ("block_table_stride", _I64), ("block_size", _I64),
        ("slot_ids", _P), ("compressed_lens", _P), ("window_lens", _P), ("new_window_rows", _P),
        ("pages", _P), ("page_stride_block", _I64), ("page_stride_row", _I64),
        ("k_offset", _I64), ("v_offset", _I64), ("k_scale_offset", _I64), ("v_scale_offset", _I64),
        ("flags_offset", _I64), ("cols_k_by_flag", _P), ("cols_v_by_flag", _P),
        ("rows", _P), ("row_stride", _I64), ("row_scales", _P), ("row_scale_stride", _I64),
        ("basis_k_rows", _P), ("basis_k_rows_strides", _I64 * 2), ("basis_v_rows", _P), ("basis_v_rows_strides", _I64 * 2),
        ("window_k_rows", _P), ("window_k_rows_stride", _I64), ("window_v_rows", _P), ("window_v_rows_stride", _I64),
        ("query", _P), ("new_keys", _P), ("new_values", _P), ("out", _P),
        ("probs_compressed", _P), ("probs_len", _I64), ("probs_window", _P),
    ]


@functools.lru_cache(maxsize=1)
def _kernel():
    return cpu_library.bind("attentionpack_latent_decode", _Args, "attentionpack_args_size")


# The fields of a layer's calls that do not change from step to step (its pages, pools and
# plan), filled in once per layer and copied per call: building them from the tensors took
# most of the call's Python time (19 of 71 us for one request, SmolLM2). Keyed by the spec
# and every tensor's address, dtype, shape and strides, so a key can only ever name equal
# fields (the entry holds the spec and the column tables, so their ids and pointers stay
# valid); bounded because tests make many short-lived pools.
_LAYER_FIELDS: dict[tuple, tuple[_Args, LatentSpec, tuple]] = {}
_LAYER_FIELDS_MAX = 256


def _layer_fields(pages: torch.Tensor, rows: SlotRows, spec: LatentSpec, num_heads: int, head_size: int) -> _Args:
    key = (id(spec), num_heads, head_size,
           *((t.data_ptr(), t.dtype, t.shape, t.stride()) for t in (pages, *rows.tensors())))
    cached = _LAYER_FIELDS.get(key)
    if cached is not None:
        return cached[0]
    layout = spec.layout
    storage = STORAGE_CODES.get(pages.dtype)
    if storage is None or rows.arena.dtype != pages.dtype:
        raise ValueError(f"the CPU decode kernel stores int8, float32 or bfloat16 rows, got pages "
                         f"{pages.dtype}, slot rows {rows.arena.dtype}")
    if pages.stride(-1) != 1 or rows.arena.stride(-1) != 1:
        raise ValueError("pages and slot rows: the CPU decode kernel needs unit stride along a row")
    if any(rows.map(n).dtype != torch.int64 or rows.map(n).stride(-1) != 1 for n in MAP_NAMES):
        raise ValueError("slot-row maps: the CPU decode kernel needs int64 maps with unit stride along a row")
    cols = {which: spec.cols_by_flag(which, "cpu") if getattr(spec, f"partial_{which}") else None
            for which in ("k", "v")}
    args = _Args(
        num_heads=num_heads, kv_heads=rows.kv_width // head_size, head_size=head_size,
        num_planes=spec.num_modalities, rank_k=layout.rank_k, rank_v=layout.rank_v, storage=storage,
        block_size=pages.shape[1], pages=_ptr(pages), page_stride_block=pages.stride(0),
        page_stride_row=pages.stride(1), k_offset=layout.k_offset, v_offset=layout.v_offset,
        k_scale_offset=layout.k_scale_offset if layout.int8 else 0,
        v_scale_offset=layout.v_scale_offset if layout.int8 else 0,
        flags_offset=layout.flags_offset, cols_k_by_flag=_ptr(cols["k"]), cols_v_by_flag=_ptr(cols["v"]),
        rows=_ptr(rows.arena), row_stride=rows.arena.stride(0), row_scales=_ptr(rows.scales),
        row_scale_stride=0 if rows.scales is None else rows.scales.stride(0),
        basis_k_rows=_ptr(rows.basis_k), basis_k_rows_strides=(_I64 * 2)(*rows.basis_k.stride()[:2]),
        basis_v_rows=_ptr(rows.basis_v), basis_v_rows_strides=(_I64 * 2)(*rows.basis_v.stride()[:2]),
        window_k_rows=_ptr(rows.window_k), window_k_rows_stride=rows.window_k.stride(0),
        window_v_rows=_ptr(rows.window_v), window_v_rows_stride=rows.window_v.stride(0))
    if len(_LAYER_FIELDS) >= _LAYER_FIELDS_MAX:
        _LAYER_FIELDS.clear()
    _LAYER_FIELDS[key] = (args, spec, tuple(cols.values()))
    return args


def latent_decode_attention_cpu(
    query: torch.Tensor,      # [B, num_heads, head_size]
    pages: torch.Tensor,      # [num_blocks, block_size, width] records
    rows: SlotRows,           # the slots' bases and exact rows (arena and maps)
    batch: DecodeBatch,
    spec: LatentSpec,
    scale: float,
    need_probs: bool = False,
    new_keys: torch.Tensor | None = None,    # [B, kv_width]: written to window row new_window_rows first
    new_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One decode step on CPU; same contract and results as `latent_decode_attention`.

    Given `new_keys` and `new_values`, each request's new token is first written to its
    window row `batch.new_window_rows` (int8: quantised as `SlotPool.write_window` does),
    so the caller skips that append. Needs only the batch's block table, slot ids and
    lengths (the PyTorch path's index tensors may be None). Reads no device value.
    """
    bsz, num_heads, head_size = query.shape
    args = _Args.from_buffer_copy(_layer_fields(pages, rows, spec, num_heads, head_size))
    kv_heads = args.kv_heads
    q = query.float().contiguous()
    out = torch.empty(bsz, num_heads, head_size, dtype=torch.float32)
    if new_keys is not None:
        new_keys, new_values = new_keys.float().contiguous(), new_values.float().contiguous()
    probs_c = probs_w = None
    if need_probs:
        probs_c = torch.zeros(bsz, kv_heads, batch.max_compressed_len, dtype=torch.float32)
        probs_w = torch.zeros(bsz, kv_heads, batch.window_size, dtype=torch.float32)
    if batch.block_table.stride(-1) != 1:
        raise ValueError("the block table: the CPU decode kernel needs unit stride along a row")
    args.batch, args.window_size, args.num_threads, args.scale = bsz, batch.window_size, torch.get_num_threads(), scale
    args.block_table, args.block_table_stride = _ptr(batch.block_table), batch.block_table.stride(0)
    args.slot_ids, args.compressed_lens = _ptr(batch.slot_ids), _ptr(batch.compressed_lens)
    args.window_lens, args.new_window_rows = _ptr(batch.window_lens), _ptr(batch.new_window_rows)
    args.query, args.new_keys, args.new_values, args.out = _ptr(q), _ptr(new_keys), _ptr(new_values), _ptr(out)
    args.probs_compressed, args.probs_len, args.probs_window = _ptr(probs_c), batch.max_compressed_len, _ptr(probs_w)
    if _kernel()(ctypes.byref(args)) != 0:
        raise ValueError(f"the CPU decode kernel refused storage code {args.storage}")
    out = out.to(query.dtype)
    if not need_probs:
        return out, None, None
    return out, probs_c.sum(1) / num_heads, probs_w.sum(1) / num_heads


# decode.decode_step hands this function the step's new token instead of appending it itself.
latent_decode_attention_cpu.fuses_window_append = True
