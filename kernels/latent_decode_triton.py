"""Fused latent-space paged decode attention in Triton.

Same contract as `latent_decode_torch.latent_decode_attention` (see there for the
math). The work is split three ways, by what moves the fewest bytes:

1. Query projection (torch, one batched GEMM): q_lat[b, m, h] = D_k[m][:, g(h)] q_h for
   both modalities, [batch, 2, num_heads, rank_k]. It is tiny next to the cache.
2. `_latent_pass` (Triton), grid (batch, splits): one pass over a request's pages
   with an online softmax. Every record is read once for all query heads: K' is
   scored against both modalities' projected queries (the record's flag picks one),
   V' is accumulated in rank space into separate image and text accumulators.
   Partial rank: a token reads only the first `group_cols[modality, group]` columns
   of its factors (masked loads). Each split writes its running max, sum and
   accumulators.
3. Combine (torch): merge the splits and the full-rank window tokens into one
   softmax, then multiply the rank-space accumulators by D_v once per head.

When the importance EMA needs per-token probabilities, `_probs_pass` re-scores the
tokens against the final per-head max and sum and writes the head average: K' is
read a second time, V' is not.

Under TRITON_INTERPRET=1 (CPU) dot products run in fp32: the interpreter's bf16 dot
is wrong. On a GPU, fp16/bf16 records are multiplied in their own dtype with fp32
accumulation.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .layout import IMAGE, TEXT, RecordLayout

NEG_INF = float("-inf")
IMAGE_IDX = tl.constexpr(IMAGE)  # modality planes of q_lat and the accumulators
TEXT_IDX = tl.constexpr(TEXT)


@triton.jit
def _score_tile(pages_ptr, block_id, stride_block, stride_row, rows, pos, clen,
                q_img, q_txt, gck_ptr, gcv_ptr, num_groups, scale,
                K_OFF: tl.constexpr, V_OFF: tl.constexpr, FLAGS_OFF: tl.constexpr,
                RANK_K: tl.constexpr, RANK_V: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr,
                PARTIAL_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """Scores [BLOCK, HQ] of one page's tokens, their image mask and value-column limit."""
    valid = pos < clen
    base = pages_ptr + block_id.to(tl.int64) * stride_block + rows * stride_row     # [BLOCK]
    flags = tl.load(base + FLAGS_OFF, mask=valid, other=0.0).to(tl.int32)
    modality = flags % 2
    group = flags // 2
    is_image = (modality == 1) & valid
    cols_v = tl.load(gcv_ptr + modality * num_groups + group, mask=valid, other=0)
    ck = tl.arange(0, RK)
    k_mask = valid[:, None] & (ck[None, :] < RANK_K)
    if PARTIAL_K:
        cols_k = tl.load(gck_ptr + modality * num_groups + group, mask=valid, other=0)
        k_mask = k_mask & (ck[None, :] < cols_k[:, None])
    k_fac = tl.load(base[:, None] + K_OFF + ck[None, :], mask=k_mask, other=0.0)   # [BLOCK, RK]
    if DOT_FP32:
        k_fac = k_fac.to(tl.float32)
    else:
        q_img = q_img.to(k_fac.dtype)
        q_txt = q_txt.to(k_fac.dtype)
    s_img = tl.dot(k_fac, tl.trans(q_img))                                          # [BLOCK, HQ]
    s_txt = tl.dot(k_fac, tl.trans(q_txt))
    scores = tl.where(is_image[:, None], s_img, s_txt) * scale
    scores = tl.where(valid[:, None], scores, float("-inf"))
    return scores, is_image, cols_v, base, valid


@triton.jit
def _latent_pass(
    q_lat_ptr,        # [batch, 2, HQ, RK] float32 (heads and ranks padded)
    pages_ptr,        # [num_blocks, block_size, width] records
    block_table_ptr,  # [batch, max_blocks] int32
    clens_ptr,        # [batch] int32: tokens stored as factors
    gck_ptr, gcv_ptr,  # [2, num_groups] int32: columns read per (modality, group)
    m_ptr, l_ptr,     # [batch, splits, HQ] float32
    acc_ptr,          # [batch, splits, 2, HQ, RV] float32
    stride_block, stride_row, stride_bt, num_groups, pages_per_split, scale,
    BLOCK: tl.constexpr, HQ: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr,
    RANK_K: tl.constexpr, RANK_V: tl.constexpr,
    K_OFF: tl.constexpr, V_OFF: tl.constexpr, FLAGS_OFF: tl.constexpr,
    PARTIAL_K: tl.constexpr, PARTIAL_V: tl.constexpr, DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    clen = tl.load(clens_ptr + b)
    hq = tl.arange(0, HQ)
    rk = tl.arange(0, RK)
    rv = tl.arange(0, RV)
    q_base = q_lat_ptr + b * 2 * HQ * RK
    q_img = tl.load(q_base + IMAGE_IDX * HQ * RK + hq[:, None] * RK + rk[None, :])   # [HQ, RK]
    q_txt = tl.load(q_base + TEXT_IDX * HQ * RK + hq[:, None] * RK + rk[None, :])

    m = tl.full([HQ], float("-inf"), tl.float32)
    l_sum = tl.zeros([HQ], tl.float32)
    acc_img = tl.zeros([HQ, RV], tl.float32)
    acc_txt = tl.zeros([HQ, RV], tl.float32)
    rows = tl.arange(0, BLOCK)
    first_page = split * pages_per_split
    num_pages = tl.cdiv(clen, BLOCK)
    last_page = tl.minimum(first_page + pages_per_split, num_pages)
    for page in range(first_page, last_page):
        block_id = tl.load(block_table_ptr + b * stride_bt + page)
        pos = page * BLOCK + rows
        scores, is_image, cols_v, base, valid = _score_tile(
            pages_ptr, block_id, stride_block, stride_row, rows, pos, clen, q_img, q_txt,
            gck_ptr, gcv_ptr, num_groups, scale, K_OFF, V_OFF, FLAGS_OFF,
            RANK_K, RANK_V, RK, RV, PARTIAL_K, DOT_FP32)
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(scores - m_safe[None, :])                                        # [BLOCK, HQ]
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        v_mask = valid[:, None] & (rv[None, :] < RANK_V)
        if PARTIAL_V:
            v_mask = v_mask & (rv[None, :] < cols_v[:, None])
        v_fac = tl.load(base[:, None] + V_OFF + rv[None, :], mask=v_mask, other=0.0)  # [BLOCK, RV]
        p_img = tl.where(is_image[:, None], p, 0.0)
        p_txt = p - p_img
        if DOT_FP32:
            v_fac = v_fac.to(tl.float32)
        else:
            p_img = p_img.to(v_fac.dtype)
            p_txt = p_txt.to(v_fac.dtype)
        acc_img = acc_img * alpha[:, None] + tl.dot(tl.trans(p_img), v_fac)
        acc_txt = acc_txt * alpha[:, None] + tl.dot(tl.trans(p_txt), v_fac)
        m = m_new

    out = (b * num_splits + split) * HQ
    tl.store(m_ptr + out + hq, m)
    tl.store(l_ptr + out + hq, l_sum)
    acc_base = acc_ptr + (b * num_splits + split) * 2 * HQ * RV
    tl.store(acc_base + IMAGE_IDX * HQ * RV + hq[:, None] * RV + rv[None, :], acc_img)
    tl.store(acc_base + TEXT_IDX * HQ * RV + hq[:, None] * RV + rv[None, :], acc_txt)


@triton.jit
def _probs_pass(
    q_lat_ptr, pages_ptr, block_table_ptr, clens_ptr, gck_ptr, gcv_ptr,
    m_final_ptr, l_final_ptr,  # [batch, HQ] float32: the whole softmax's max and sum
    probs_ptr,                 # [batch, max_len] float32: head-averaged probability
    stride_block, stride_row, stride_bt, stride_probs, num_groups, pages_per_split, scale,
    num_heads,
    BLOCK: tl.constexpr, HQ: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr,
    RANK_K: tl.constexpr, RANK_V: tl.constexpr,
    K_OFF: tl.constexpr, V_OFF: tl.constexpr, FLAGS_OFF: tl.constexpr,
    PARTIAL_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    clen = tl.load(clens_ptr + b)
    hq = tl.arange(0, HQ)
    rk = tl.arange(0, RK)
    q_base = q_lat_ptr + b * 2 * HQ * RK
    q_img = tl.load(q_base + IMAGE_IDX * HQ * RK + hq[:, None] * RK + rk[None, :])
    q_txt = tl.load(q_base + TEXT_IDX * HQ * RK + hq[:, None] * RK + rk[None, :])
    m_final = tl.load(m_final_ptr + b * HQ + hq)
    inv_l = 1.0 / tl.load(l_final_ptr + b * HQ + hq)
    real_head = hq < num_heads
    rows = tl.arange(0, BLOCK)
    first_page = split * pages_per_split
    last_page = tl.minimum(first_page + pages_per_split, tl.cdiv(clen, BLOCK))
    for page in range(first_page, last_page):
        block_id = tl.load(block_table_ptr + b * stride_bt + page)
        pos = page * BLOCK + rows
        scores, is_image, cols_v, base, valid = _score_tile(
            pages_ptr, block_id, stride_block, stride_row, rows, pos, clen, q_img, q_txt,
            gck_ptr, gcv_ptr, num_groups, scale, K_OFF, V_OFF, FLAGS_OFF,
            RANK_K, RANK_V, RK, RV, PARTIAL_K, DOT_FP32)
        p = tl.exp(scores - m_final[None, :]) * inv_l[None, :]
        p = tl.where(real_head[None, :], p, 0.0)
        tl.store(probs_ptr + b * stride_probs + pos, tl.sum(p, axis=1) / num_heads, mask=valid)


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def latent_decode_attention_triton(
    query: torch.Tensor,          # [batch, num_heads, head_size]
    pages: torch.Tensor,          # [num_blocks, block_size, width]
    block_table: torch.Tensor,    # [batch, max_blocks] int
    compressed_lens: torch.Tensor,  # [batch] int
    slot_ids: torch.Tensor,       # [batch] int
    basis_k: torch.Tensor,        # [num_slots, 2, rank_k, kv_width]
    basis_v: torch.Tensor,        # [num_slots, 2, rank_v, kv_width]
    window_k: torch.Tensor,       # [num_slots, window, kv_width]
    window_v: torch.Tensor,       # [num_slots, window, kv_width]
    window_lens: torch.Tensor,    # [batch] int
    group_cols_k: torch.Tensor,   # [2, num_groups] int
    group_cols_v: torch.Tensor,   # [2, num_groups] int
    layout: RecordLayout,
    scale: float,
    max_compressed_len: int | None = None,
    need_probs: bool = True,
    pages_per_split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One decode step; same contract as the PyTorch path (probabilities only with `need_probs`)."""
    batch, num_heads, head_size = query.shape
    num_kv_heads = basis_k.shape[-1] // head_size
    group = num_heads // num_kv_heads
    block_size = pages.shape[1]
    assert block_size & (block_size - 1) == 0 and block_size >= 16, "block_size: a power of 2, >= 16"
    assert pages.stride(-1) == 1, "records must be contiguous"
    rank_k, rank_v = layout.rank_k, layout.rank_v
    hq, rk, rv = _pow2(num_heads), _pow2(rank_k), _pow2(rank_v)
    device = query.device
    f32 = torch.float32
    slots = slot_ids.long()
    if max_compressed_len is None:
        max_compressed_len = int(compressed_lens.max()) if batch else 0

    # 1. Project queries per modality: [batch, 2, num_heads, rank_k], padded.
    q = query.to(f32).view(batch, num_kv_heads, group, head_size)
    # Bases stay in their storage dtype (no fp32 copies of the largest per-request
    # tensors); products accumulate in fp32 and only their small results are upcast.
    store = basis_k.dtype
    bk = basis_k[slots].view(batch, 2, rank_k, num_kv_heads, head_size)
    q_lat = torch.zeros(batch, 2, hq, rk, dtype=f32, device=device)
    q_lat[:, :, :num_heads, :rank_k] = torch.einsum(
        "bmrkd,bkgd->bmkgr", bk, q.to(store)).to(f32).reshape(batch, 2, num_heads, rank_k)

    # 2. One pass over the pages.
    max_pages = max(1, -(-max_compressed_len // block_size))
    if pages_per_split is None:
        pages_per_split = max(1, -(-max_pages // 8)) if batch < 64 else max_pages
    splits = -(-max_pages // pages_per_split)
    m = torch.empty(batch, splits, hq, dtype=f32, device=device)
    l_sum = torch.empty_like(m)
    acc = torch.empty(batch, splits, 2, hq, rv, dtype=f32, device=device)
    block_table = block_table.to(torch.int32)
    clens = compressed_lens.to(torch.int32).contiguous()
    gck = group_cols_k.to(torch.int32).contiguous()
    gcv = group_cols_v.to(torch.int32).contiguous()
    partial_k = bool((gck < rank_k).any())
    partial_v = bool((gcv < rank_v).any())
    dot_fp32 = _interpreted() or pages.dtype == f32
    common = dict(BLOCK=block_size, HQ=hq, RK=rk, RV=rv, RANK_K=rank_k, RANK_V=rank_v,
                  K_OFF=layout.k_offset, V_OFF=layout.v_offset, FLAGS_OFF=layout.flags_offset,
                  PARTIAL_K=partial_k, DOT_FP32=dot_fp32)
    if batch:
        _latent_pass[(batch, splits)](
            q_lat, pages, block_table, clens, gck, gcv, m, l_sum, acc,
            pages.stride(0), pages.stride(1), block_table.stride(0), gck.shape[1], pages_per_split,
            scale, PARTIAL_V=partial_v, **common)

    # 3. Merge splits and window tokens into one softmax; D_v once per head.
    window = window_k.shape[1]
    w_valid = torch.arange(window, device=device)[None, :] < window_lens[:, None].long()
    wk = window_k[slots].to(f32).masked_fill(~w_valid[..., None], 0.0).view(batch, window, num_kv_heads, head_size)
    wv = window_v[slots].to(f32).masked_fill(~w_valid[..., None], 0.0).view(batch, window, num_kv_heads, head_size)
    w_scores = torch.einsum("bwkd,bkgd->bkgw", wk, q).reshape(batch, num_heads, window) * scale
    w_scores = w_scores.masked_fill(~w_valid[:, None, :], NEG_INF)

    m_h = m[:, :, :num_heads]                                        # [batch, splits, H]
    m_all = torch.maximum(m_h.amax(dim=1), w_scores.amax(dim=-1))    # [batch, H]
    m_all = torch.where(torch.isinf(m_all), torch.zeros_like(m_all), m_all)
    split_scale = torch.exp(m_h - m_all[:, None, :])                 # 0 for empty splits
    p_w = torch.exp(w_scores - m_all[..., None])                     # [batch, H, W]
    total = (l_sum[:, :, :num_heads] * split_scale).sum(1) + p_w.sum(-1)
    inv_total = 1.0 / total
    acc_h = (acc[:, :, :, :num_heads, :rank_v] * split_scale[:, :, None, :, None]).sum(1)
    acc_h = acc_h * inv_total[:, None, :, None]                      # [batch, 2, H, rank_v]
    p_w = p_w * inv_total[..., None]
    bv = basis_v[slots].view(batch, 2, rank_v, num_kv_heads, head_size)
    acc_h = acc_h.view(batch, 2, num_kv_heads, group, rank_v).to(store)
    out = (torch.einsum("bkgr,brkd->bkgd", acc_h[:, IMAGE], bv[:, IMAGE]).to(f32)
           + torch.einsum("bkgr,brkd->bkgd", acc_h[:, TEXT], bv[:, TEXT]).to(f32)
           + torch.einsum("bkgw,bwkd->bkgd", p_w.view(batch, num_kv_heads, group, window), wv))
    out = out.reshape(batch, num_heads, head_size).to(query.dtype)
    if not need_probs:
        return out, None, None

    probs = torch.zeros(batch, max(max_compressed_len, 1), dtype=f32, device=device)
    m_pad = torch.zeros(batch, hq, dtype=f32, device=device)
    l_pad = torch.ones(batch, hq, dtype=f32, device=device)
    m_pad[:, :num_heads], l_pad[:, :num_heads] = m_all, total
    if batch:
        _probs_pass[(batch, splits)](
            q_lat, pages, block_table, clens, gck, gcv, m_pad, l_pad, probs,
            pages.stride(0), pages.stride(1), block_table.stride(0), probs.stride(0),
            gck.shape[1], pages_per_split, scale, num_heads, **common)
    return out, probs[:, :max_compressed_len], p_w.mean(dim=1)
