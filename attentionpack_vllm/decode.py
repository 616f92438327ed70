"""One AttentionPack decode step for a batch of requests, and the folds it schedules.

Within a step, every layer: the new token joins its request's full-rank window,
attention runs in latent space over factors plus window, and (with partial rank) the
importance EMA is updated in place. That part is a fixed sequence of batched ops
with no host reads, so a CUDA graph can capture it. Windows that filled in this step
are then folded into the text basis, all due requests in one batched call
(`paged_store.fold_windows`), outside the captured part. Which requests fold is
decided on the host (`windows.WindowTracker`) when the step's metadata is built.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .importance import update_importance
from .kernels.decode_inputs import DecodeBatch, make_decode_batch
from .kernels.latent_decode_torch import latent_decode_attention
from .paged_store import FoldBatch, fold_windows, make_fold_batch
from .plan import CompressionPlan
from .slot_pool import SlotPool
from .windows import WindowTracker

DecodeAttention = Callable[..., tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


def schedule_decode(tracker: WindowTracker, plan: CompressionPlan, block_table: torch.Tensor,
                    slot_ids: Sequence[int], seq_lens: Sequence[int], block_size: int,
                    with_index: bool = True) -> tuple[DecodeBatch, FoldBatch | None]:
    """A step's metadata, once for all layers: the decode batch and the folds it makes due.

    block_table: [B, max_blocks] rows of the decoding requests; slot_ids, seq_lens:
    host lists (seq_lens include the new token). Advances the tracker's windows.
    `with_index` builds the PyTorch path's index tensors (the importance EMA needs
    them on any path).
    """
    exact_lens, due = tracker.advance(slot_ids)
    batch = make_decode_batch(block_table, slot_ids, seq_lens, exact_lens, window_size=plan.exact_rows,
                              block_size=block_size, with_index=with_index or plan.tracks_importance)
    if not due:
        return batch, None
    rows = torch.tensor(due, dtype=torch.int64, device=block_table.device)
    folds = make_fold_batch(block_table[rows], [slot_ids[i] for i in due],
                            [seq_lens[i] - exact_lens[i] for i in due],
                            [exact_lens[i] - plan.sink_tokens for i in due],
                            block_size, plan.window_size)
    return batch, folds


def append_to_window(pool: SlotPool, batch: DecodeBatch, keys: torch.Tensor, values: torch.Tensor,
                     track_importance: bool = True, write_rows: bool = True) -> None:
    """Write each request's new token ([B, kv_width] keys and values) into its window row
    (unless `write_rows` is False: a kernel that appends in its own pass).

    Its importance starts at 0 (kept only while partial rank needs it); its page record
    is written when the window folds.
    """
    rows = (batch.slot_ids, batch.new_window_rows)
    if write_rows:
        pool.write_window(rows, keys, values)
    if track_importance:
        pool.window_importance.index_put_(rows, torch.zeros((), device=keys.device))


def decode_step(
    query: torch.Tensor,        # [B, num_heads, head_size]
    key: torch.Tensor,          # [B, kv_width] (after RoPE)
    value: torch.Tensor,        # [B, kv_width]
    pages: torch.Tensor,        # [num_blocks, block_size, width]
    pool: SlotPool,
    plan: CompressionPlan,
    batch: DecodeBatch,
    scale: float,
    attention: DecodeAttention = latent_decode_attention,
) -> torch.Tensor:
    """Append, attend, update importance; returns [B, num_heads, head_size].

    The importance EMA is kept only while partial rank is on (it decides nothing
    otherwise). Folds are the caller's next call (`fold_windows`), for the rows the
    step's metadata marks as due.
    """
    # The compiled CPU kernel writes the new token's rows itself, in the same pass.
    fused = getattr(attention, "fuses_window_append", False)
    append_to_window(pool, batch, key, value, plan.tracks_importance, write_rows=not fused)
    extra = dict(new_keys=key, new_values=value) if fused else {}
    out, p_c, p_w = attention(query, pages, pool.rows, batch, plan.spec, scale,
                              need_probs=plan.tracks_importance, **extra)
    if plan.tracks_importance:
        update_importance(pages, pool, batch, p_c, p_w, plan)
    return out


def decode_and_fold(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pages: torch.Tensor,
                    pool: SlotPool, plan: CompressionPlan, batch: DecodeBatch, folds: FoldBatch | None,
                    scale: float, attention: DecodeAttention = latent_decode_attention) -> torch.Tensor:
    """`decode_step`, then the step's due folds; returns [B, num_heads, head_size]."""
    out = decode_step(query, key, value, pages, pool, plan, batch, scale, attention)
    if folds is not None:
        fold_windows(pages, pool, plan, folds)
    return out
