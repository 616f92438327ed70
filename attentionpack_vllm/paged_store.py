"""Writing AttentionPack's paged cache: prefill compression and window folds.

Pages are `[num_blocks, block_size, width]` records (see kernels/layout.py), addressed
through block tables and flat slots exactly as vLLM addresses its pages. A request's
first `sink_tokens` tokens are exact rows in its slot (never factorised); the tokens
after them are factor records [0, compressed_len) in its pages, in order, and its
newest decode tokens are the window's exact rows (their records are written when the
window is folded). Attention does not depend on where a key sits, so records need not
sit at their token's position: the pages keep `sink_tokens` spare rows at the end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import factorize
from .importance import groups_by_importance, regroup_records
from .kernels import fold_cpu
from .kernels.decode_inputs import page_slots_of, ragged_positions
from .kernels.layout import IMAGE, TEXT, decode_flags, encode_flags
from .kernels.storage import (pack_records, record_factors, record_flags, record_importance,
                              take_rows, write_record_fields)
from .plan import CompressionPlan
from .slot_pool import SlotPool


def page_slots(block_table_row: torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Flat page slots of positions [start, end) of one request: [end - start] int64."""
    pos = torch.arange(start, end, device=block_table_row.device)
    return block_table_row.long()[pos // block_size] * block_size + pos % block_size


def read_records(pages: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[len(slots), width] records at flat slots."""
    return take_rows(pages.view(-1, pages.shape[-1]), slots)


def write_records(pages: torch.Tensor, slots: torch.Tensor, plan: CompressionPlan, **fields) -> None:
    """Write the given fields (k, v: factors; importance; flags) of the records at flat
    slots; other fields are left as they are."""
    write_record_fields(pages.view(-1, pages.shape[-1]), slots, plan.layout, **fields)


def compress_tokens(pages: torch.Tensor, pool: SlotPool, slot: int, block_table_row: torch.Tensor,
                    plan: CompressionPlan, start: int, keys: torch.Tensor, values: torch.Tensor,
                    is_image: torch.Tensor, importance: torch.Tensor | None = None) -> None:
    """Store a request's tokens as factor records [start, start + len(keys)).

    keys, values: [num_tokens, kv_width] (heads concatenated, keys after RoPE);
    is_image: [num_tokens] bool. Records before `start` must already be factors in
    the pages (a later prefill chunk, or a window fold); each modality's new rows
    are folded into that modality's basis and the stored factors are rotated.
    A new request's slot must be reset first (`SlotPool.reset`). `importance`
    ([num_tokens]) initialises the new records' scores; None keeps what the pages
    hold at those positions.
    """
    block_size = pages.shape[1]
    new_slots = page_slots(block_table_row, start, start + keys.shape[0], block_size)
    old_slots = page_slots(block_table_row, 0, start, block_size)
    old_modality, _ = decode_flags(record_flags(read_records(pages, old_slots), plan.layout))
    if importance is None:
        importance = record_importance(read_records(pages, new_slots), plan.layout)
    if not plan.has_image and bool(is_image.any()):
        raise ValueError("AttentionPack: image tokens in a request of a plan without image bases "
                         "(the model was not recognised as multimodal)")
    for modality in ((TEXT, IMAGE) if plan.has_image else (TEXT,)):
        new_mask = is_image if modality == IMAGE else ~is_image
        if not bool(new_mask.any()):
            continue
        old_m = old_slots[old_modality == modality]
        new_m = new_slots[new_mask]
        old_k, old_v = record_factors(read_records(pages, old_m), plan.layout)
        layout = plan.layout
        energy = plan.text_energy if modality == TEXT else None
        folded = {}
        for name, rows, basis, rank, stored, width in (
            ("k", keys[new_mask], "basis_k", plan.ranks_k[modality], old_k, layout.rank_k),
            ("v", values[new_mask], "basis_v", plan.ranks_v[modality], old_v, layout.rank_v),
        ):
            old_factors = stored[:, :rank]
            basis_rows = (slot, modality, slice(None, rank))
            if start == 0:  # a new request: nothing to fold into, factorise the rows alone
                low = factorize.factorize(rows, rank, plan.svd, energy)
                result = factorize.Fold(rotation=torch.zeros(rank, rank, device=rows.device),
                                        new_factors=low.factors, basis=low.basis)
            else:
                result = factorize.fold(old_factors, pool.read(basis, basis_rows), rows, rank, plan.svd,
                                        energy)
            pool.write(basis, basis_rows, result.basis)
            # Pad to the record's width so no stale column survives past this rank.
            pad = lambda t: torch.nn.functional.pad(t, (0, width - rank))  # noqa: E731
            folded[name] = (pad(old_factors.float() @ result.rotation), pad(result.new_factors))
        write_records(pages, old_m, plan, k=folded["k"][0], v=folded["v"][0])
        write_records(pages, new_m, plan, k=folded["k"][1], v=folded["v"][1],
                      importance=importance[new_mask],
                      flags=torch.full_like(new_m, encode_flags(modality, 0)))




@dataclass
class FoldBatch:
    """Requests whose windows fold into the text basis together, with their page index.

    Records [0, compressed_len) of a request are factors before the fold and
    [0, compressed_len + count) after it. Every shape is known on the host.
    """

    slot_ids: torch.Tensor          # [F] int64
    compressed_lens: torch.Tensor   # [F] int64, before the fold
    counts: torch.Tensor            # [F] int64: window rows to fold
    max_len: int                    # host: max(compressed_len + count), the padded length
    record_slots: torch.Tensor      # [F, max_len] int64 flat page slots (padding clamped)
    valid_index: torch.Tensor       # [N] int64: valid positions in the flattened [F, max_len]
    valid_slots: torch.Tensor       # [N] int64: their flat page slots
    window_index: torch.Tensor      # [W] int64: the folding window rows in the flattened [F, window]
    window_slots: torch.Tensor      # [W] int64: the flat page slots their records go to

    @property
    def size(self) -> int:
        return self.slot_ids.shape[0]


def make_fold_batch(block_table: torch.Tensor, slot_ids: Sequence[int], compressed_lens: Sequence[int],
                    counts: Sequence[int], block_size: int, window_size: int) -> FoldBatch:
    """Index the folds of `len(slot_ids)` requests (block_table: their rows, [F, max_blocks];
    `window_size`: the rows of a window after the sinks)."""
    device = block_table.device
    as_long = lambda xs: torch.tensor(list(xs), dtype=torch.int64, device=device)  # noqa: E731
    after = [c + n for c, n in zip(compressed_lens, counts)]
    max_len = max(after, default=0)
    positions = torch.arange(max_len, device=device).expand(len(after), max_len)
    record_slots = page_slots_of(block_table, positions, block_size)
    lengths = as_long(after)
    rows, cols = ragged_positions(after, lengths)
    valid_index = rows * max_len + cols
    window_rows, window_cols = ragged_positions(counts, as_long(counts))
    c_lens = as_long(compressed_lens)
    return FoldBatch(slot_ids=as_long(slot_ids), compressed_lens=c_lens,
                     counts=as_long(counts), max_len=max_len, record_slots=record_slots,
                     valid_index=valid_index, valid_slots=record_slots.reshape(-1)[valid_index],
                     window_index=window_rows * window_size + window_cols,
                     window_slots=record_slots[window_rows, c_lens[window_rows] + window_cols])


def fold_windows(pages: torch.Tensor, pool: SlotPool, plan: CompressionPlan, folds: FoldBatch) -> None:
    """Fold the windows of every request in `folds` into its text basis, in one batched call.

    The window rows are factorised together with the request's text factors
    (`factorize.fold_batch`), the stored text factors are rotated into the new
    basis, the window tokens get their records (factors, their importance, text
    flags), and, with partial rank, every factor token of the request is regrouped.
    Image tokens keep their factors. The caller clears the windows' host-side lengths.

    On CPU (with the compiled kernels) the old records are read and rotated in place
    (`_fold_windows_in_place`), and with partial rank only their flags are rewritten;
    otherwise, and as the reference the tests hold that to, every record is rebuilt in
    PyTorch.
    """
    if folds.size == 0:
        return
    if fold_cpu.supports(pages):
        _fold_windows_in_place(pages, pool, plan, folds)
    else:
        _fold_windows_rebuilt(pages, pool, plan, folds)


def _window_rows(plan: CompressionPlan, folds: FoldBatch) -> tuple[tuple, torch.Tensor]:
    """(pool index of the folding windows' rows, after the sinks; [F, window] mask of the rows
    each request folds)."""
    mask = torch.arange(plan.window_size, device=folds.counts.device)[None, :] < folds.counts[:, None]
    return (folds.slot_ids, slice(plan.sink_tokens, None)), mask


def _fold_windows_in_place(pages: torch.Tensor, pool: SlotPool, plan: CompressionPlan, folds: FoldBatch) -> None:
    """The fold on CPU: the old text factors' column energies and their rotation into the new
    basis are two compiled passes over the records where they are stored (kernels/fold_cpu.py);
    the fold itself needs only those energies (`factorize.fold_batch_diagonal`: factors that
    factorisations and folds made have a diagonal Gram matrix). The window tokens' records
    are then written whole; with partial rank every factor token's group is then reassigned
    from the importance the records hold (`importance.regroup_records`)."""
    layout, slots = plan.layout, folds.slot_ids
    ranks = (plan.ranks_k[TEXT], plan.ranks_v[TEXT])
    energies = fold_cpu.text_energies(pages, folds.record_slots, folds.compressed_lens, layout, *ranks)
    window_rows, window_mask = _window_rows(plan, folds)
    results = []
    for window, basis, rank, old_energies in zip(("window_k", "window_v"), ("basis_k", "basis_v"), ranks, energies):
        rows = pool.read(window, window_rows) * window_mask[..., None]
        basis_rows = (slots, TEXT, slice(None, rank))
        result = factorize.fold_batch_diagonal(old_energies, pool.read(basis, basis_rows), rows, rank, plan.svd,
                                               plan.text_energy)
        pool.write(basis, basis_rows, result.basis)
        results.append(result)
    fold_cpu.rotate_text_records(pages, folds.record_slots, folds.compressed_lens, layout,
                                 results[0].rotation, results[1].rotation)
    new_factors = [torch.nn.functional.pad(r.new_factors.reshape(-1, rank)[folds.window_index], (0, width - rank))
                   for r, rank, width in zip(results, ranks, (layout.rank_k, layout.rank_v))]
    importance = pool.window_importance[window_rows].reshape(-1)[folds.window_index]
    records = pack_records(layout, pages.dtype, *new_factors, importance,
                           torch.full_like(folds.window_slots, encode_flags(TEXT, 0)))
    pages.view(-1, layout.width)[folds.window_slots] = records
    if plan.tracks_importance and plan.num_groups > 1:
        regroup_records(pages, plan, folds.record_slots, folds.compressed_lens + folds.counts,
                        folds.valid_index, folds.valid_slots)


def _fold_windows_rebuilt(pages: torch.Tensor, pool: SlotPool, plan: CompressionPlan, folds: FoldBatch) -> None:
    """The fold with every record of the folding requests read, rebuilt and written back in
    PyTorch (any device; regroups by importance with partial rank)."""
    layout, slots = plan.layout, folds.slot_ids
    flat = pages.view(-1, layout.width)
    positions = torch.arange(folds.max_len, device=pages.device)[None, :]
    c_lens = folds.compressed_lens[:, None]
    in_window = (positions >= c_lens) & (positions < c_lens + folds.counts[:, None])   # [F, L]
    window_row = (positions - c_lens).clamp(0, plan.window_size - 1)                  # [F, L]
    raw = take_rows(flat, folds.record_slots)                                         # [F, L, width]
    raw.masked_fill_(~(positions < c_lens)[..., None], 0)                             # old tokens only
    old_modality = record_flags(raw, layout) % 2
    old_text = (old_modality == TEXT) & (positions < c_lens)

    window_rows, window_mask = _window_rows(plan, folds)
    # The stored text factors come from factorisations and folds: their Gram matrix is
    # diagonal (exactly so for the eigendecomposition methods; see factorize.fold_batch).
    diagonal_gram = factorize.resolve_method(plan.svd.method, pages.device) != "randomized"
    factors = []  # the records' K' and V', rebuilt whole (no strided writes)
    for window, basis, rank, stored, width in zip(
            ("window_k", "window_v"), ("basis_k", "basis_v"), (plan.ranks_k[TEXT], plan.ranks_v[TEXT]),
            record_factors(raw, layout), (layout.rank_k, layout.rank_v)):
        old = stored[..., :rank] * old_text[..., None]
        rows = pool.read(window, window_rows) * window_mask[..., None]
        basis_rows = (slots, TEXT, slice(None, rank))
        result = factorize.fold_batch(old, pool.read(basis, basis_rows), rows, rank, plan.svd,
                                      plan.text_energy, diagonal_gram=diagonal_gram)
        pool.write(basis, basis_rows, result.basis)
        # Text rank below the record's width: zero columns past it (the window's rows were stale).
        rotated = torch.nn.functional.pad(torch.matmul(old, result.rotation), (0, width - rank))
        new = torch.nn.functional.pad(result.new_factors, (0, width - rank))
        new = new.gather(1, window_row[..., None].expand(-1, -1, width))
        factors.append(torch.where(in_window[..., None], new, torch.where(old_text[..., None], rotated, stored)))
    importance = torch.where(in_window, pool.window_importance[window_rows].gather(1, window_row),
                             record_importance(raw, layout))
    modality = torch.where(in_window, TEXT, old_modality)
    group = 0
    if plan.tracks_importance and plan.num_groups > 1:
        group = groups_by_importance(importance, c_lens[:, 0] + folds.counts, plan.group_fractions)
    out = pack_records(layout, pages.dtype, *factors, importance, encode_flags(modality, group))
    flat[folds.valid_slots] = out.reshape(-1, layout.width)[folds.valid_index]
