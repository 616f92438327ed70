"""Naive oracle: rebuild dense K and V from the paged factors and run plain softmax.

Deliberately simple (one request at a time, explicit reconstruction) so that it is
obviously right; the latent-space paths are checked against it.
"""
from __future__ import annotations

import torch

from .latent_decode_torch import factor_column_mask
from .layout import RecordLayout, decode_flags
from .storage import record_factors, record_flags


def reconstruct_request_kv(
    pages: torch.Tensor,        # [num_blocks, block_size, width]
    block_table_row: torch.Tensor,  # [max_blocks] int
    compressed_len: int,
    basis_k: torch.Tensor,      # [2, rank_k, kv_width] (this request's slot, as floats)
    basis_v: torch.Tensor,      # [2, rank_v, kv_width]
    window_k: torch.Tensor,     # [window, kv_width] (as floats)
    window_v: torch.Tensor,     # [window, kv_width]
    window_len: int,
    layout: RecordLayout,
    group_cols_k: torch.Tensor | None = None,  # [2, num_groups]; None = all columns
    group_cols_v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense keys and values of one request, [compressed_len + window_len, kv_width], float32."""
    block_size = pages.shape[1]
    pos = torch.arange(compressed_len)
    slots = block_table_row.long()[pos // block_size] * block_size + pos % block_size
    records = pages.reshape(-1, pages.shape[-1])[slots]
    flags = record_flags(records, layout)
    modality, _ = decode_flags(flags)
    k_fac, v_fac = record_factors(records, layout)
    if group_cols_k is not None:
        k_fac = k_fac * factor_column_mask(flags, group_cols_k, layout.rank_k)
    if group_cols_v is not None:
        v_fac = v_fac * factor_column_mask(flags, group_cols_v, layout.rank_v)
    keys = torch.stack([k_fac[i] @ basis_k[modality[i]].float() for i in range(compressed_len)]) \
        if compressed_len else torch.zeros(0, basis_k.shape[-1])
    values = torch.stack([v_fac[i] @ basis_v[modality[i]].float() for i in range(compressed_len)]) \
        if compressed_len else torch.zeros(0, basis_v.shape[-1])
    keys = torch.cat([keys, window_k[:window_len].float()])
    values = torch.cat([values, window_v[:window_len].float()])
    return keys, values


def dense_attention(
    query: torch.Tensor,   # [num_tokens, num_heads, head_size]
    keys: torch.Tensor,    # [seq_len, num_kv_heads * head_size]
    values: torch.Tensor,  # [seq_len, num_kv_heads * head_size]
    scale: float,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention with grouped KV heads.

    With `causal`, query i sits at position seq_len - num_tokens + i.
    Returns (output [num_tokens, num_heads, head_size] float32,
             probs [num_tokens, num_heads, seq_len] float32).
    """
    num_tokens, num_heads, head_size = query.shape
    seq_len = keys.shape[0]
    num_kv_heads = keys.shape[1] // head_size
    group = num_heads // num_kv_heads
    k = keys.float().view(seq_len, num_kv_heads, head_size).repeat_interleave(group, dim=1)
    v = values.float().view(seq_len, num_kv_heads, head_size).repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->qhk", query.float(), k) * scale
    if causal:
        q_pos = torch.arange(num_tokens)[:, None] + seq_len - num_tokens
        future = torch.arange(seq_len)[None, :] > q_pos                  # [num_tokens, seq_len]
        scores = scores.masked_fill(future[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("qhk,khd->qhd", probs, v), probs
