"""Prefill of one request (or one chunk of it): exact attention, then compression.

A first chunk attends causally over its own exact keys and values. A later chunk
attends over the earlier chunks (sinks exact, the rest rebuilt from their factors)
plus its own exact rows. Then the chunk's first tokens fill the request's sink rows
while any are free, the rest are folded into the request's per-modality bases, and
each new token's importance starts from the chunk's last query (with partial rank; else at zero).
"""
from __future__ import annotations

from typing import Callable

import torch

from .importance import regroup_records
from .kernels.layout import IMAGE, TEXT
from .kernels.storage import record_factors, record_flags
from .paged_store import compress_tokens, fold_windows, make_fold_batch, page_slots, read_records
from .plan import CompressionPlan
from .slot_pool import SlotPool


def causal_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """query: [n, num_heads, head_size]; keys, values: [ctx + n, kv_width].

    Query i sits at position ctx + i. Returns [n, num_heads, head_size] in query dtype.
    """
    n, num_heads, head_size = query.shape
    total = keys.shape[0]
    num_kv_heads = keys.shape[1] // head_size
    q = query.float().transpose(0, 1)                                  # [H, n, D]
    k = keys.float().view(total, num_kv_heads, head_size).transpose(0, 1)
    v = values.float().view(total, num_kv_heads, head_size).transpose(0, 1)
    # No earlier tokens: SDPA's own causal path (no mask tensor; measured 25 % faster). With
    # earlier tokens an explicit mask, as SDPA's is_causal aligns queries to the top left.
    visible = None
    if total > n:
        visible = torch.arange(total, device=query.device)[None, :] <= \
            torch.arange(n, device=query.device)[:, None] + (total - n)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=visible, is_causal=visible is None, scale=scale,
        enable_gqa=num_heads != num_kv_heads)
    return out.transpose(0, 1).to(query.dtype)


def last_token_importance(query_last: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Initial importance from the last query: [seq_len] = seq_len * head-averaged probability.

    query_last: [num_heads, head_size]; keys: [seq_len, kv_width].
    """
    num_heads, head_size = query_last.shape
    seq_len = keys.shape[0]
    k = keys.float().view(seq_len, -1, head_size)
    k = k.repeat_interleave(num_heads // k.shape[1], dim=1)
    probs = torch.softmax(torch.einsum("hd,thd->ht", query_last.float(), k) * scale, dim=-1)
    return probs.mean(0) * seq_len


def reconstruct_prefix(pages: torch.Tensor, pool: SlotPool, slot: int, block_table_row: torch.Tensor,
                       num_records: int, plan: CompressionPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense keys and values of a request's first `num_records` factor records,
    [num_records, kv_width] float32."""
    raw = read_records(pages, page_slots(block_table_row, 0, num_records, pages.shape[1]))
    is_image = ((record_flags(raw, plan.layout) % 2) == IMAGE)[:, None]
    k_fac, v_fac = record_factors(raw, plan.layout)
    basis_k, basis_v = pool.read("basis_k", slot), pool.read("basis_v", slot)
    keys, values = k_fac @ basis_k[TEXT], v_fac @ basis_v[TEXT]
    if plan.has_image:
        keys = torch.where(is_image, k_fac @ basis_k[IMAGE], keys)
        values = torch.where(is_image, v_fac @ basis_v[IMAGE], values)
    return keys, values


def prefill_request(
    query: torch.Tensor,        # [num_tokens, num_heads, head_size]
    keys: torch.Tensor,         # [num_tokens, kv_width] (after RoPE)
    values: torch.Tensor,       # [num_tokens, kv_width]
    is_image: torch.Tensor,     # [num_tokens] bool
    pages: torch.Tensor,        # [num_blocks, block_size, width]
    pool: SlotPool,
    plan: CompressionPlan,
    slot: int,
    block_table_row: torch.Tensor,  # [max_blocks]
    context_len: int,           # tokens of this request already cached
    exact_len: int,             # of those, the ones in the slot's exact rows (sinks + window)
    scale: float,
    attention: Callable[..., torch.Tensor] = causal_attention,  # exact causal attention
) -> torch.Tensor:
    """Attend, then store the chunk; returns [num_tokens, num_heads, head_size].

    `attention` computes the exact attention with `causal_attention`'s contract (the vLLM
    backend passes vLLM's CPU kernel on CPU, `cpu_attention.py`).

    The window (rows left by one-token chunks) is folded first, so that every earlier
    token is a sink or a factor; afterwards the slot holds min(sink_tokens, context_len
    + num_tokens) exact rows (`WindowTracker.prefilled`).
    """
    sinks = min(exact_len, plan.sink_tokens)
    window_len = exact_len - sinks
    num_records = context_len - exact_len
    if context_len == 0:
        pool.reset(slot)  # a new request, or a preempted one starting over
    elif window_len:
        folds = make_fold_batch(block_table_row[None], [slot], [num_records], [window_len], pages.shape[1],
                                plan.window_size)
        fold_windows(pages, pool, plan, folds)
        num_records += window_len
    prefix_k, prefix_v = reconstruct_prefix(pages, pool, slot, block_table_row, num_records, plan)
    # Attention ignores the keys' order: the sinks first, then the records, then the chunk.
    sink_rows = (slot, slice(None, sinks))
    all_k = torch.cat([pool.read("window_k", sink_rows), prefix_k, keys.float()])
    all_v = torch.cat([pool.read("window_v", sink_rows), prefix_v, values.float()])
    out = attention(query, all_k, all_v, scale)
    # The scores decide partial-rank groups only; without partial rank they start at zero.
    importance = (last_token_importance(query[-1], all_k, scale)[context_len:] if plan.tracks_importance
                  else keys.new_zeros(keys.shape[0], dtype=torch.float32))
    store_tokens(pages, pool, plan, slot, block_table_row, sinks, num_records, keys, values, is_image,
                 importance)
    return out


def store_tokens(pages: torch.Tensor, pool: SlotPool, plan: CompressionPlan, slot: int,
                 block_table_row: torch.Tensor, sinks: int, num_records: int, keys: torch.Tensor,
                 values: torch.Tensor, is_image: torch.Tensor, importance: torch.Tensor) -> None:
    """Store a request's next tokens after its `sinks` sink rows and `num_records` factor
    records (its window empty): free sink rows take the first tokens, the rest become
    factor records, and with partial rank the request's records are regrouped."""
    take = min(plan.sink_tokens - sinks, keys.shape[0])
    if take:
        pool.write("window_k", (slot, slice(sinks, sinks + take)), keys[:take])
        pool.write("window_v", (slot, slice(sinks, sinks + take)), values[:take])
    if take == keys.shape[0]:
        return
    compress_tokens(pages, pool, slot, block_table_row, plan, num_records, keys[take:], values[take:],
                    is_image[take:], importance[take:])
    if plan.tracks_importance and plan.num_groups > 1:
        regroup(pages, plan, block_table_row, num_records + keys.shape[0] - take)


def regroup(pages: torch.Tensor, plan: CompressionPlan, block_table_row: torch.Tensor, length: int) -> None:
    """Reassign the partial-rank groups of a request's `length` factor tokens from their importance."""
    slots = page_slots(block_table_row, 0, length, pages.shape[1])
    regroup_records(pages, plan, slots[None], torch.tensor([length], device=pages.device),
                    torch.arange(length, device=pages.device), slots)
