"""Stored numbers to float32 and back: 16-bit storage as is, int8 storage with scales.

Two kinds of stored rows:
* page records (`kernels/layout.py`): `record_factors`, `record_importance`,
  `record_flags` read fields out of raw rows (`read_importance` straight from the
  pages; `record_factor_parts` leaves the scales to the caller); `encode_record_fields` / `write_record_fields`
  / `pack_records` write them. int8 records hold K' and V' with one float32 scale
  each (absmax / 127 of the token's factors).
* slot rows (bases and exact window rows, `[..., kv_width]` with heads concatenated):
  `quantize` / `dequantize` with one float32 scale per row and KV head, since
  heads differ in scale (a key head with outlier channels would otherwise flatten
  the others).

Plain PyTorch; no vLLM.
"""
from __future__ import annotations

import torch

from .layout import FLOAT32_BYTES, RecordLayout

INT8_MAX = 127.0


def take_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[index] for an integer tensor indexing t's first dimension ([*index.shape, *t.shape[1:]]).

    Through `index_select`: PyTorch's advanced indexing reads rows many times slower on
    CPU (ten requests' int8 window rows: 66 against 4 us)."""
    return t.index_select(0, index.reshape(-1)).view(*index.shape, *t.shape[1:])


def quantize(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., width] -> (int8 [..., width], float32 scales [..., groups]): symmetric,
    absmax / 127 per group of `width // groups` consecutive columns. An all-zero group
    gets scale 0 and zeros."""
    shape = x.shape
    grouped = x.float().reshape(*shape[:-1], groups, shape[-1] // groups)
    # abs().amax() rather than the inf-norm: the same values, and about 10x faster on CPU
    # for these short groups (768 rows of 80: 22 against 216 us).
    scale = grouped.abs().amax(dim=-1) / INT8_MAX
    # |x| / (absmax / 127) exceeds 127 by round-off at most, so rounding never passes 127.
    q = torch.round(grouped / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None])
    return q.to(torch.int8).reshape(shape), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize`: int8 [..., width] and scales [..., groups] -> float32 [..., width]."""
    groups = scale.shape[-1]
    grouped = q.float().reshape(*q.shape[:-1], groups, q.shape[-1] // groups)
    return (grouped * scale[..., None]).reshape(q.shape)


# --- page records --------------------------------------------------------------------------

def _float_field(raw: torch.Tensor, offset: int) -> torch.Tensor:
    """[..., width] int8 rows -> [...] float32 stored in bytes [offset, offset + 4)."""
    return raw[..., offset:offset + FLOAT32_BYTES].contiguous().view(torch.float32)[..., 0]


def _float_bytes(values: torch.Tensor) -> torch.Tensor:
    """[...] -> [..., 4] int8: the bytes of each value as float32."""
    return values.float().contiguous().view(torch.int8).reshape(*values.shape, FLOAT32_BYTES)


def record_factors(raw: torch.Tensor, layout: RecordLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(K' [..., rank_k], V' [..., rank_v]) as float32 from raw record rows."""
    k = raw[..., layout.k_offset:layout.k_offset + layout.rank_k].float()
    v = raw[..., layout.v_offset:layout.v_offset + layout.rank_v].float()
    if layout.int8:
        k = k * _float_field(raw, layout.k_scale_offset)[..., None]
        v = v * _float_field(raw, layout.v_scale_offset)[..., None]
    return k, v


def record_factor_parts(raw: torch.Tensor, layout: RecordLayout):
    """(K' [..., rank_k], K' scale [...] or None, V' [..., rank_v], V' scale or None) as
    float32: `record_factors` with the per-token scales not yet applied, so that a caller
    can apply them to a smaller product (a score per head rather than a factor per column)."""
    k = raw[..., layout.k_offset:layout.k_offset + layout.rank_k].float()
    v = raw[..., layout.v_offset:layout.v_offset + layout.rank_v].float()
    if not layout.int8:
        return k, None, v, None
    return k, _float_field(raw, layout.k_scale_offset), v, _float_field(raw, layout.v_scale_offset)


def record_importance(raw: torch.Tensor, layout: RecordLayout) -> torch.Tensor:
    """[...] float32 importance from raw record rows."""
    if layout.int8:
        return _float_field(raw, layout.importance_offset)
    return raw[..., layout.importance_offset].float()


def read_importance(flat: torch.Tensor, slots: torch.Tensor, layout: RecordLayout) -> torch.Tensor:
    """[len(slots)] float32 importance of the records at flat page slots, reading only
    that field's columns."""
    width = FLOAT32_BYTES if layout.int8 else 1
    part = take_rows(flat, slots)[..., layout.importance_offset:layout.importance_offset + width]
    return part.contiguous().view(torch.float32)[..., 0] if layout.int8 else part[..., 0].float()


def record_flags(raw: torch.Tensor, layout: RecordLayout) -> torch.Tensor:
    """[...] int64 flags (modality + 2 * group) from raw record rows."""
    return raw[..., layout.flags_offset].long()  # small integers: exact in every format


def encode_record_fields(layout: RecordLayout, dtype: torch.dtype, *, k=None, v=None, importance=None,
                         flags=None) -> list[tuple[slice, torch.Tensor]]:
    """The given fields as (columns, values [..., n] in the page dtype) pairs.

    k, v: [..., columns] float factors (fewer columns than the record's rank are
    written from the field's start); importance, flags: [...]."""
    fields = []
    for offset, scale_offset, factors in ((layout.k_offset, layout.k_scale_offset, k),
                                          (layout.v_offset, layout.v_scale_offset, v)):
        if factors is None:
            continue
        cols = slice(offset, offset + factors.shape[-1])
        if layout.int8:
            q, scale = quantize(factors, 1)
            fields += [(cols, q), (slice(scale_offset, scale_offset + FLOAT32_BYTES), _float_bytes(scale[..., 0]))]
        else:
            fields.append((cols, factors.to(dtype)))
    if importance is not None:
        off = layout.importance_offset
        if layout.int8:
            fields.append((slice(off, off + FLOAT32_BYTES), _float_bytes(importance)))
        else:
            fields.append((slice(off, off + 1), importance.to(dtype)[..., None]))
    if flags is not None:
        fields.append((slice(layout.flags_offset, layout.flags_offset + 1), flags.to(dtype)[..., None]))
    return fields


def write_record_fields(flat: torch.Tensor, slots: torch.Tensor, layout: RecordLayout, **fields) -> None:
    """Write the given fields (see `encode_record_fields`) of the records at flat page
    slots; other fields are left as they are. flat: [num_slots, width] pages."""
    for cols, values in encode_record_fields(layout, flat.dtype, **fields):
        flat[slots, cols] = values


def pack_records(layout: RecordLayout, dtype: torch.dtype, k: torch.Tensor, v: torch.Tensor,
                 importance: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Whole record rows [..., width] in the page dtype from every field (k: [..., rank_k],
    v: [..., rank_v]; padding bytes zero)."""
    out = torch.zeros(*importance.shape, layout.width, dtype=dtype, device=importance.device)
    for cols, values in encode_record_fields(layout, dtype, k=k, v=v, importance=importance, flags=flags):
        out[..., cols] = values
    return out
