"""One AttentionPack decode step for a batch of requests.

The order within a decode step: the new token joins its request's full-rank window,
attention runs in latent space over factors plus window, the importance EMA and
partial-rank groups are updated from that step's probabilities, and full windows
are folded into the text basis. The vLLM backend calls these with its metadata;
they are plain functions of tensors, testable without vLLM.
"""
from __future__ import annotations

from typing import Callable

import torch

from .importance import update_importance
from .kernels.latent_decode_torch import latent_decode_attention
from .paged_store import append_to_window, fold_window
from .plan import CompressionPlan
from .slot_pool import SlotPool

DecodeAttention = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def decode_step(
    query: torch.Tensor,        # [batch, num_heads, head_size]
    key: torch.Tensor,          # [batch, kv_width] (after RoPE)
    value: torch.Tensor,        # [batch, kv_width]
    pages: torch.Tensor,        # [num_blocks, block_size, width]
    pool: SlotPool,
    plan: CompressionPlan,
    block_table: torch.Tensor,  # [batch, max_blocks]
    seq_lens: torch.Tensor,     # [batch] int, including the new token
    slot_ids: torch.Tensor,     # [batch] int
    scale: float,
    attention: DecodeAttention = latent_decode_attention,
) -> torch.Tensor:
    """Append, attend, update importance, fold; returns [batch, num_heads, head_size].

    The importance EMA is kept only while partial rank is on (it decides nothing otherwise).
    """
    block_size = pages.shape[1]
    seq = seq_lens.long()
    new_pos = seq - 1
    new_slots = block_table.long().gather(1, (new_pos // block_size)[:, None])[:, 0] * block_size \
        + new_pos % block_size
    append_to_window(pages, pool, slot_ids, new_slots, key, value, plan)
    window_lens = pool.window_lens[slot_ids.long()]
    compressed_lens = seq - window_lens.long()
    group_cols_k, group_cols_v = plan.group_cols_tensors(query.device)
    out, p_c, p_w = attention(
        query, pages, block_table, compressed_lens, slot_ids,
        pool.basis_k, pool.basis_v, pool.window_k, pool.window_v, window_lens,
        group_cols_k, group_cols_v, plan.layout, scale,
        max_compressed_len=int(compressed_lens.max()), need_probs=plan.tracks_importance)
    if plan.tracks_importance:
        update_importance(pages, block_table, compressed_lens, window_lens, p_c, p_w, plan)
    full = (window_lens >= plan.window_size).nonzero().flatten().tolist()
    for b in full:
        fold_window(pages, pool, int(slot_ids[b]), block_table[b], int(compressed_lens[b]), plan)
    return out
