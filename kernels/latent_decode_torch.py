"""Decode attention in AttentionPack's latent space, in batched PyTorch.

K and V are never rebuilt. For a query head h reading KV head g, with D_k[m] the
key basis of modality m (rank x num_kv_heads*head_size) and K'_t the token's factors:

    q_h . k_t = (D_k[m][:, g] q_h) . K'_t                       (score)
    sum_t p_t v_t = sum_m (sum_{t in m} p_t V'_t) D_v[m][:, g]  (output)

Each query head is projected once per modality (rank x head_size), every cached token
is scored with a rank-long dot product, values are accumulated in rank space per
modality and multiplied by D_v once per head. The request's full-rank window of
newest tokens joins the same softmax as ordinary K/V. Partial rank: a token of
group f contributes only the first `group_cols[modality, f]` columns of its factors.

This is the path the CPU backend runs and the reference the Triton kernel is
checked against. Requests are padded to the longest in the batch; no Python loop
runs over tokens or requests.
"""
from __future__ import annotations

import torch

from .layout import IMAGE, TEXT, RecordLayout, decode_flags


def gather_records(pages: torch.Tensor, block_table: torch.Tensor, max_len: int) -> torch.Tensor:
    """Records of the first `max_len` positions of every request.

    pages: [num_blocks, block_size, width]; block_table: [batch, max_blocks].
    Returns [batch, max_len, width] (rows past a request's length are whatever the
    pages hold; callers mask them).
    """
    block_size = pages.shape[1]
    num_blocks = -(-max_len // block_size)
    rows = pages[block_table[:, :num_blocks].long()]  # [batch, num_blocks, block_size, width]
    return rows.reshape(block_table.shape[0], num_blocks * block_size, -1)[:, :max_len]


def factor_column_mask(flags: torch.Tensor, group_cols: torch.Tensor, rank: int) -> torch.Tensor:
    """[..., rank] mask keeping each token's first group_cols[modality, group] columns."""
    modality, group = decode_flags(flags)
    cols = group_cols[modality, group]  # [...]
    return torch.arange(rank, device=flags.device) < cols.unsqueeze(-1)


def column_counts(group_cols: torch.Tensor) -> list[int]:
    """The distinct numbers of factor columns the groups read (0, reading nothing, left out)."""
    return sorted(c for c in set(group_cols.flatten().tolist()) if c > 0)


def latent_decode_attention(
    query: torch.Tensor,          # [batch, num_heads, head_size]
    pages: torch.Tensor,          # [num_blocks, block_size, width]
    block_table: torch.Tensor,    # [batch, max_blocks] int
    compressed_lens: torch.Tensor,  # [batch] int: tokens stored as factors in pages
    slot_ids: torch.Tensor,       # [batch] int: the request's slot in the pools below
    basis_k: torch.Tensor,        # [num_slots, 2, rank_k, num_kv_heads * head_size]
    basis_v: torch.Tensor,        # [num_slots, 2, rank_v, num_kv_heads * head_size]
    window_k: torch.Tensor,       # [num_slots, window, num_kv_heads * head_size]
    window_v: torch.Tensor,       # [num_slots, window, num_kv_heads * head_size]
    window_lens: torch.Tensor,    # [batch] int: valid window tokens (newest positions)
    group_cols_k: torch.Tensor,   # [2, num_groups] int: K' columns read per (modality, group)
    group_cols_v: torch.Tensor,   # [2, num_groups] int: V' columns read per (modality, group)
    layout: RecordLayout,
    scale: float,
    max_compressed_len: int | None = None,
    need_probs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One decode step for a batch of requests (one query token each).

    Returns (output [batch, num_heads, head_size] in query dtype,
             compressed_probs [batch, max_compressed_len] float32,
             window_probs [batch, window] float32), the probabilities averaged over
    heads, zero at padded positions (None, None without `need_probs`).
    """
    batch, num_heads, head_size = query.shape
    num_kv_heads = basis_k.shape[-1] // head_size
    group = num_heads // num_kv_heads
    rank_k, rank_v = layout.rank_k, layout.rank_v
    if max_compressed_len is None:
        max_compressed_len = int(compressed_lens.max()) if batch else 0
    f32 = torch.float32

    q = query.to(f32).view(batch, num_kv_heads, group, head_size)
    slots = slot_ids.long()

    # Compressed tokens: scores in rank space.
    positions = torch.arange(max_compressed_len, device=query.device)
    valid = positions[None, :] < compressed_lens[:, None].long()          # [batch, T]
    # Rows past a request's length hold stale bytes of other requests: zeroing them (not
    # a product with a mask) keeps even a stale NaN out of the sums. The gather made a
    # copy, so this writes nothing back to the pages.
    records = gather_records(pages, block_table, max_compressed_len).to(f32)
    records.masked_fill_(~valid[..., None], 0.0)
    modality, group_index = decode_flags(records[..., layout.flags_offset].round().long())
    is_image = modality == IMAGE                                    # [batch, T]
    # The modalities present in this batch; the other's products are skipped.
    present = [m for m, mask in ((IMAGE, is_image), (TEXT, ~is_image & valid)) if bool(mask.any())]
    k_fac = records[..., layout.k_offset:layout.k_offset + rank_k]
    v_fac = records[..., layout.v_offset:layout.v_offset + rank_v]
    # Partial rank: a token reads the first cols[modality, group] columns of its factors.
    # Rather than masking [batch, T, rank] factors, each distinct column count is one
    # product over a prefix of the columns, selected per token ([batch, T] masks only);
    # with a single count (keys by default) there is nothing to select.

    bk = basis_k[slots].to(f32).view(batch, 2, rank_k, num_kv_heads, head_size)
    q_lat = torch.einsum("bmrkd,bkgd->bmkgr", bk, q).reshape(batch, 2, num_heads, rank_k)
    counts = column_counts(group_cols_k)
    k_cols = group_cols_k[modality, group_index] if len(counts) > 1 else None   # [batch, T]
    scores = torch.zeros(batch, num_heads, max_compressed_len, device=query.device)
    for cols in counts:
        per_modality = {m: torch.einsum("btr,bhr->bht", k_fac[..., :cols], q_lat[:, m, :, :cols])
                        for m in present}
        if len(per_modality) == 2:
            part = torch.where(is_image[:, None, :], per_modality[IMAGE], per_modality[TEXT])
        else:
            part = next(iter(per_modality.values()), scores)
        scores = part if k_cols is None else torch.where((k_cols == cols)[:, None, :], part, scores)
    scores = (scores * scale).masked_fill(~valid[:, None, :], float("-inf"))

    # Window tokens: ordinary full-rank K/V.
    window = window_k.shape[1]
    w_valid = torch.arange(window, device=query.device)[None, :] < window_lens[:, None].long()
    wk = window_k[slots].to(f32).masked_fill(~w_valid[..., None], 0.0)
    wv = window_v[slots].to(f32).masked_fill(~w_valid[..., None], 0.0)
    wk = wk.view(batch, window, num_kv_heads, head_size)
    wv = wv.view(batch, window, num_kv_heads, head_size)
    w_scores = torch.einsum("bwkd,bkgd->bkgw", wk, q).reshape(batch, num_heads, window) * scale
    w_scores = w_scores.masked_fill(~w_valid[:, None, :], float("-inf"))

    probs = torch.softmax(torch.cat([scores, w_scores], dim=-1), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a request with nothing to attend (never in use)
    p_c, p_w = probs[..., :max_compressed_len], probs[..., max_compressed_len:]

    # Values: accumulate in rank space per modality, one D_v product per head.
    bv = basis_v[slots].to(f32).view(batch, 2, rank_v, num_kv_heads, head_size)
    out = torch.einsum("bkgw,bwkd->bkgd", p_w.view(batch, num_kv_heads, group, window), wv)
    for m in present:
        acc = torch.zeros(batch, num_heads, rank_v, device=query.device)
        of_m = modality == m
        v_counts = column_counts(group_cols_v[m])
        v_cols = group_cols_v[m][group_index] if len(v_counts) > 1 else None
        for cols in v_counts:
            chosen = (of_m if v_cols is None else of_m & (v_cols == cols)).to(f32)[:, None, :]
            acc[..., :cols] += torch.einsum("bht,btr->bhr", p_c * chosen, v_fac[..., :cols])
        out = out + torch.einsum("bkgr,brkd->bkgd", acc.view(batch, num_kv_heads, group, rank_v),
                                 bv[:, m])
    out = out.reshape(batch, num_heads, head_size).to(query.dtype)
    if not need_probs:
        return out, None, None
    return out, p_c.mean(dim=1), p_w.mean(dim=1)
