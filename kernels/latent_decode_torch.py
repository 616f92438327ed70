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
checked against. A fixed sequence of batched ops: requests are padded to the
longest, every shape and branch comes from `LatentSpec` and the host-side sizes in
`DecodeBatch`, and no device value is read back.
"""
from __future__ import annotations

import torch

from .decode_inputs import DecodeBatch, LatentSpec
from .layout import IMAGE, TEXT, decode_flags
from .slot_rows import SlotRows, gather_rows
from .storage import record_factor_parts, record_flags


def factor_column_mask(flags: torch.Tensor, group_cols: torch.Tensor, rank: int) -> torch.Tensor:
    """[..., rank] mask keeping each token's first group_cols[modality, group] columns."""
    modality, group = decode_flags(flags)
    cols = group_cols[modality, group]  # [...]
    return torch.arange(rank, device=flags.device) < cols.unsqueeze(-1)


def _project(basis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """basis [B, M, R, KV*D], x [B, KV, G, D] -> [B, M, KV*G, R]: every head's x in rank space."""
    batch, planes, rank, width = basis.shape
    kv, group, head_size = x.shape[1:]
    b = basis.view(batch, planes * rank, kv, head_size).transpose(1, 2)   # [B, KV, M*R, D]
    out = torch.matmul(b, x.transpose(-1, -2))                            # [B, KV, M*R, G]
    return out.view(batch, kv, planes, rank, group).permute(0, 2, 1, 4, 3).reshape(
        batch, planes, kv * group, rank)


def _banded_product(weights: torch.Tensor, factors: torch.Tensor, token_cols: torch.Tensor | None,
                    bands) -> torch.Tensor:
    """sum_t weights[..., t] * factors[t, :cols_t] as [B, P, rank], one product per column band.

    weights [B, P, T]; factors [B, T, rank]; token_cols [B, T] (None: every token reads
    every column, one band).
    """
    if token_cols is None:
        return torch.matmul(weights, factors)
    parts = [torch.matmul(weights * (token_cols >= hi)[:, None, :].to(weights.dtype), factors[..., lo:hi])
             for lo, hi in bands]
    return torch.cat(parts, dim=-1)


def latent_decode_attention(
    query: torch.Tensor,      # [B, num_heads, head_size]
    pages: torch.Tensor,      # [num_blocks, block_size, width] records
    rows: SlotRows,           # the slots' bases and exact rows (arena and maps)
    batch: DecodeBatch,
    spec: LatentSpec,
    scale: float,
    need_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One decode step for a batch of requests (one query token each).

    With int8 storage (`spec.layout.int8`) the slot rows are int8 with their float32
    scales in `rows.scales`.

    Returns (output [B, num_heads, head_size] in query dtype,
             compressed_probs [B, T] float32, window_probs [B, window] float32),
    the probabilities averaged over heads and zero at padded positions (None, None
    without `need_probs`). Needs `batch` built with its index tensors.
    """
    bsz, num_heads, head_size = query.shape
    kv_heads = rows.kv_width // head_size
    group = num_heads // kv_heads
    layout, t_max = spec.layout, batch.max_compressed_len
    f32 = torch.float32
    slots = batch.slot_ids
    q = (query.to(f32) * scale).view(bsz, kv_heads, group, head_size)

    # Compressed tokens: whole pages in one index_select. Rows past a request's length
    # hold stale bytes of other requests: zeroing them in the gathered copy (not a
    # product with a mask) keeps even a stale NaN out of the sums.
    gathered = batch.buffer("pages", (batch.gather_blocks.shape[0], *pages.shape[1:]), pages.dtype, pages.device)
    torch.index_select(pages, 0, batch.gather_blocks, out=gathered)
    gathered = gathered.view(-1, layout.width)
    gathered.index_fill_(0, batch.pad_rows, 0)
    records = gathered.view(bsz, -1, layout.width)[:, :t_max]                # [B, T, width]
    flag_index = record_flags(records, layout) if spec.partial_k or spec.partial_v or spec.has_image else None
    is_image = (flag_index & 1).bool() if spec.has_image else None
    # int8 records: the per-token scales multiply the scores and the probabilities (a value
    # per head and token), not the factors (a value per column and token).
    k_fac, k_scale, v_fac, v_scale = record_factor_parts(records, layout)  # float32

    def slot_rows(name: str) -> torch.Tensor:
        """The batch's rows of `name` as float32 (a basis only the spec's planes)."""
        return gather_rows(rows, name, slots, spec.num_modalities if name.startswith("basis") else None)

    q_lat = _project(slot_rows("basis_k"), q)                          # [B, M, H, Rk]
    k_cols = spec.cols_by_flag("k", query.device)[flag_index] if spec.partial_k else None
    if spec.partial_k:
        # Columns a token does not read contribute nothing to its score.
        k_fac = k_fac * (torch.arange(layout.rank_k, device=query.device) < k_cols[..., None])
    scores = torch.matmul(q_lat.reshape(bsz, -1, layout.rank_k), k_fac.transpose(1, 2))  # [B, M*H, T]
    if k_scale is not None:
        scores = scores * k_scale[:, None, :]
    if spec.has_image:
        scores = scores.view(bsz, 2, num_heads, t_max)
        scores = torch.where(is_image[:, None, :], scores[:, IMAGE], scores[:, TEXT])
    scores = scores.masked_fill(batch.compressed_pad[:, None, :], float("-inf"))

    # Window tokens: ordinary full-rank K/V (rows past a window's length are finite
    # leftovers of the same slot; their scores are masked).
    w_keys = slot_rows("window_k").view(bsz, -1, kv_heads, head_size)  # [B, W, KV, D]
    w_scores = torch.matmul(q, w_keys.permute(0, 2, 3, 1)).view(bsz, num_heads, -1)
    w_scores = w_scores.masked_fill(batch.window_pad[:, None, :], float("-inf"))

    probs = torch.softmax(torch.cat([scores, w_scores], dim=-1), dim=-1)
    p_c, p_w = probs[..., :t_max], probs[..., t_max:]

    # Values: accumulate in rank space per modality, one D_v product per head.
    if spec.has_image:
        p_img = p_c * is_image[:, None, :]
        per_modality = torch.cat([p_c - p_img, p_img], dim=1)               # [B, 2H] (TEXT, IMAGE)
    else:
        per_modality = p_c
    v_cols = spec.cols_by_flag("v", query.device)[flag_index] if spec.partial_v else None
    if v_scale is not None:
        per_modality = per_modality * v_scale[:, None, :]
    acc = _banded_product(per_modality, v_fac, v_cols, spec.column_bands("v"))  # [B, M*H, Rv]
    acc = acc.view(bsz, spec.num_modalities, kv_heads, group, layout.rank_v)
    b_v = slot_rows("basis_v").view(bsz, spec.num_modalities, layout.rank_v, kv_heads, head_size)
    out = torch.einsum("bmkgr,bmrkd->bkgd", acc, b_v)
    w_values = slot_rows("window_v").view(bsz, -1, kv_heads, head_size)
    out = out + torch.matmul(p_w.view(bsz, kv_heads, group, -1), w_values.transpose(1, 2))
    out = out.reshape(bsz, num_heads, head_size).to(query.dtype)
    if not need_probs:
        return out, None, None
    return out, p_c.mean(dim=1), p_w.mean(dim=1)
