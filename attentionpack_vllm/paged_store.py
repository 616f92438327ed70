"""Writing AttentionPack's paged cache: prefill compression, decode appends, window folds.

Pages are `[num_blocks, block_size, width]` records (see kernels/layout.py), addressed
through block tables and flat slots exactly as vLLM addresses its pages. A request's
positions [0, compressed_len) are factors in the pages; positions
[compressed_len, compressed_len + window_len) are full-rank rows in its slot's window
(their page rows hold only importance and flags until they are folded).
"""
from __future__ import annotations

import torch

from .factorize import fold
from .kernels.layout import IMAGE, TEXT, decode_flags, encode_flags
from .plan import CompressionPlan
from .slot_pool import SlotPool


def page_slots(block_table_row: torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Flat page slots of positions [start, end) of one request: [end - start] int64."""
    pos = torch.arange(start, end, device=block_table_row.device)
    return block_table_row.long()[pos // block_size] * block_size + pos % block_size


def batch_page_slots(block_table: torch.Tensor, max_len: int, block_size: int) -> torch.Tensor:
    """Flat page slots of positions [0, max_len) of every request: [batch, max_len] int64."""
    pos = torch.arange(max_len, device=block_table.device)
    blocks = block_table.long()[:, (pos // block_size).clamp_max(block_table.shape[1] - 1)]
    return blocks * block_size + pos % block_size


def read_records(pages: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[len(slots), width] records at flat slots."""
    return pages.view(-1, pages.shape[-1])[slots]


def write_records(pages: torch.Tensor, slots: torch.Tensor, plan: CompressionPlan, *,
                  k_factors: torch.Tensor | None = None, v_factors: torch.Tensor | None = None,
                  importance: torch.Tensor | None = None, flags: torch.Tensor | None = None) -> None:
    """Write the given fields of the records at flat slots; other fields are left as they are."""
    flat = pages.view(-1, pages.shape[-1])
    layout = plan.layout
    if k_factors is not None:
        flat[slots, layout.k_offset:layout.k_offset + k_factors.shape[1]] = k_factors.to(pages.dtype)
    if v_factors is not None:
        flat[slots, layout.v_offset:layout.v_offset + v_factors.shape[1]] = v_factors.to(pages.dtype)
    if importance is not None:
        flat[slots, layout.importance_offset] = importance.to(pages.dtype)
    if flags is not None:
        flat[slots, layout.flags_offset] = flags.to(pages.dtype)


def compress_tokens(pages: torch.Tensor, pool: SlotPool, slot: int, block_table_row: torch.Tensor,
                    plan: CompressionPlan, start: int, keys: torch.Tensor, values: torch.Tensor,
                    is_image: torch.Tensor, importance: torch.Tensor | None = None) -> None:
    """Store positions [start, start + len(keys)) of a request as factors.

    keys, values: [num_tokens, kv_width] (heads concatenated, keys after RoPE);
    is_image: [num_tokens] bool. Positions before `start` must already be factors in
    the pages (a later prefill chunk, or a window fold); each modality's new rows
    are folded into that modality's basis and the stored factors are rotated.
    A new request's slot must be reset first (`SlotPool.reset`). `importance`
    ([num_tokens]) initialises the new records' scores; None keeps what the pages
    hold at those positions.
    """
    block_size = pages.shape[1]
    new_slots = page_slots(block_table_row, start, start + keys.shape[0], block_size)
    old_slots = page_slots(block_table_row, 0, start, block_size)
    old_modality, _ = decode_flags(read_records(pages, old_slots)[:, plan.layout.flags_offset].round().long())
    if importance is None:
        importance = read_records(pages, new_slots)[:, plan.layout.importance_offset]
    for modality in (TEXT, IMAGE):
        new_mask = is_image if modality == IMAGE else ~is_image
        if not bool(new_mask.any()):
            continue
        old_m = old_slots[old_modality == modality]
        new_m = new_slots[new_mask]
        old_records = read_records(pages, old_m)
        layout = plan.layout
        folded = {}
        for name, rows, basis, rank, offset, width in (
            ("k", keys[new_mask], pool.basis_k, plan.ranks_k[modality], layout.k_offset, layout.rank_k),
            ("v", values[new_mask], pool.basis_v, plan.ranks_v[modality], layout.v_offset, layout.rank_v),
        ):
            old_factors = old_records[:, offset:offset + rank]
            result = fold(old_factors, basis[slot, modality, :rank], rows, rank, plan.svd)
            basis[slot, modality, :rank] = result.basis.to(basis.dtype)
            # Pad to the record's width so no stale column survives past this rank.
            pad = lambda t: torch.nn.functional.pad(t, (0, width - rank))  # noqa: E731
            folded[name] = (pad(old_factors.float() @ result.rotation), pad(result.new_factors))
        write_records(pages, old_m, plan, k_factors=folded["k"][0], v_factors=folded["v"][0])
        write_records(pages, new_m, plan, k_factors=folded["k"][1], v_factors=folded["v"][1],
                      importance=importance[new_mask],
                      flags=torch.full_like(new_m, encode_flags(modality, 0)))


def append_to_window(pages: torch.Tensor, pool: SlotPool, slot_ids: torch.Tensor,
                     page_slots_new: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     plan: CompressionPlan) -> None:
    """Append one decode token per request to its slot's window.

    slot_ids: [batch]; page_slots_new: [batch] flat page slots of the new positions;
    keys, values: [batch, kv_width]. The new positions' records get importance 0
    and text/full-rank flags; their factors are written when the window is folded.
    Every window must have room (fold full windows first).
    """
    slots = slot_ids.long()
    lens = pool.window_lens[slots].long()
    if bool((lens >= plan.window_size).any()):
        raise RuntimeError("AttentionPack window overflow: a full window was not folded")
    pool.window_k[slots, lens] = keys.to(pool.window_k.dtype)
    pool.window_v[slots, lens] = values.to(pool.window_v.dtype)
    pool.window_lens[slots] += 1
    zero = torch.zeros(slots.shape[0], dtype=pages.dtype, device=pages.device)
    write_records(pages, page_slots_new, plan, importance=zero, flags=zero + encode_flags(TEXT, 0))


def fold_window(pages: torch.Tensor, pool: SlotPool, slot: int, block_table_row: torch.Tensor,
                compressed_len: int, plan: CompressionPlan) -> int:
    """Fold the slot's window into the text basis; returns the new compressed length."""
    count = int(pool.window_lens[slot])
    if count == 0:
        return compressed_len
    keys, values = pool.window_k[slot, :count], pool.window_v[slot, :count]
    is_image = torch.zeros(count, dtype=torch.bool, device=keys.device)
    compress_tokens(pages, pool, slot, block_table_row, plan, compressed_len, keys, values, is_image)
    pool.window_lens[slot] = 0
    return compressed_len + count
