"""Dense paged decode attention in Triton: the baseline AttentionPack is measured against.

Built like `latent_decode_triton` so that the comparison is about the bytes read,
not about kernel craft: the same page walk, the same online softmax, the same
split-and-combine. The difference is what a page holds: full K and V of every KV
head, vLLM's layout

    pages [num_blocks, block_size, 2, num_kv_heads, head_size]   (K then V)

addressed through a block table, a token at position t of request b living in block
block_table[b, t // block_size], row t % block_size.

1. `_dense_pass` (Triton), grid (batch, num_kv_heads, splits): a program loads the
   G = num_heads / num_kv_heads query heads of its KV head (rows padded to >= 16 for
   tl.dot), walks its share of the request's pages reading full K and V tiles
   [block_size, head_size], and keeps a running max, sum and accumulator per query
   head. Each split writes its partials (real heads and dims only).
2. Combine (torch): merge the splits into one softmax per head.

Under TRITON_INTERPRET=1 (CPU) dot products run in fp32: the interpreter's bf16 dot
is wrong. On a GPU, fp16/bf16 pages are multiplied in their own dtype with fp32
accumulation.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

NEG_INF = float("-inf")
PROGRAMS_PER_SM = 4  # splits are chosen so that the grid fills the GPU about this many times


@triton.jit
def _dense_pass(
    q_ptr,            # [batch, num_heads, head_size] query (last dim contiguous)
    pages_ptr,        # [num_blocks, block_size, 2, num_kv_heads, head_size] K then V
    block_table_ptr,  # [batch, max_blocks] int32
    seq_lens_ptr,     # [batch] int32: tokens of each request
    m_ptr, l_ptr,     # [batch, num_kv_heads, splits, G] float32: running max and sum
    acc_ptr,          # [batch, num_kv_heads, splits, G, HEAD_SIZE] float32: unnormalised output
    stride_qb, stride_qh, stride_block, stride_row, stride_kv, stride_head, stride_bt,
    pages_per_split, scale,
    G: tl.constexpr, HEAD_SIZE: tl.constexpr, BLOCK: tl.constexpr,
    GP: tl.constexpr, DP: tl.constexpr, DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    num_splits = tl.num_programs(2)
    seq_len = tl.load(seq_lens_ptr + b)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    g_mask = g < G
    d_mask = d < HEAD_SIZE
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (kvh * G + g)[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)                  # [GP, DP]
    if DOT_FP32:
        q = q.to(tl.float32)
    else:
        q = q.to(pages_ptr.dtype.element_ty)

    m = tl.full([GP], float("-inf"), tl.float32)
    l_sum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    rows = tl.arange(0, BLOCK)
    head_ptr = pages_ptr + kvh.to(tl.int64) * stride_head
    first_page = split * pages_per_split
    last_page = tl.minimum(first_page + pages_per_split, tl.cdiv(seq_len, BLOCK))
    for page in range(first_page, last_page):
        block_id = tl.load(block_table_ptr + b.to(tl.int64) * stride_bt + page).to(tl.int64)
        pos = page * BLOCK + rows
        valid = pos < seq_len
        base = head_ptr + block_id * stride_block + rows * stride_row                # [BLOCK]
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(base[:, None] + d[None, :], mask=kv_mask, other=0.0)             # [BLOCK, DP]
        if DOT_FP32:
            k = k.to(tl.float32)
        scores = tl.dot(k, tl.trans(q)) * scale                                      # [BLOCK, GP]
        scores = tl.where(valid[:, None], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(scores - m_safe[None, :])                                         # [BLOCK, GP]
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        # Masked: rows past the request hold stale bytes (possibly NaN) of other requests.
        v = tl.load(base[:, None] + stride_kv + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK, DP]
        if DOT_FP32:
            v = v.to(tl.float32)
        else:
            p = p.to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(tl.trans(p), v)                          # [GP, DP]
        m = m_new

    out = ((b.to(tl.int64) * num_kv_heads + kvh) * num_splits + split) * G          # first row of this program
    tl.store(m_ptr + out + g, m, mask=g_mask)
    tl.store(l_ptr + out + g, l_sum, mask=g_mask)
    tl.store(acc_ptr + (out + g)[:, None] * HEAD_SIZE + d[None, :], acc,
             mask=g_mask[:, None] & d_mask[None, :])


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_pages_per_split(batch: int, num_kv_heads: int, max_pages: int,
                            device: torch.device) -> int:
    """Split long requests until the grid covers the GPU ~PROGRAMS_PER_SM times over."""
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8 * max(1, batch * num_kv_heads)  # interpreter: a few splits, to exercise the combine
    splits = max(1, min(max_pages, -(-target // max(1, batch * num_kv_heads))))
    return max(1, -(-max_pages // splits))


def dense_paged_decode_attention(
    query: torch.Tensor,        # [batch, num_heads, head_size]
    pages: torch.Tensor,        # [num_blocks, block_size, 2, num_kv_heads, head_size]
    block_table: torch.Tensor,  # [batch, max_blocks] int
    seq_lens: torch.Tensor,     # [batch] int: tokens of each request (>= 1)
    scale: float,
    pages_per_split: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """One decode step of plain softmax attention over paged K/V.

    Returns [batch, num_heads, head_size] in the query's dtype. `max_seq_len` bounds
    the grid (default: the block table's width, which costs no device-to-host sync).
    A request with no tokens gets a zero output.
    """
    batch, num_heads, head_size = query.shape
    assert pages.dim() == 5 and pages.shape[2] == 2, \
        "pages: [num_blocks, block_size, 2, num_kv_heads, head_size]"
    num_kv_heads = pages.shape[3]
    assert pages.shape[4] == head_size, "pages and query disagree on head_size"
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    block_size = pages.shape[1]
    assert block_size & (block_size - 1) == 0 and block_size >= 16, "block_size: a power of 2, >= 16"
    assert pages.stride(-1) == 1 and query.stride(-1) == 1, "head_size must be contiguous"
    assert block_table.dim() == 2 and block_table.shape[0] == batch, "block_table: [batch, max_blocks]"
    assert seq_lens.shape == (batch,), "seq_lens: [batch]"
    assert query.device == pages.device == block_table.device == seq_lens.device
    group = num_heads // num_kv_heads
    device = query.device
    f32 = torch.float32

    if max_seq_len is None:
        max_pages = block_table.shape[1]
    else:
        max_pages = -(-max_seq_len // block_size)
        assert max_pages <= block_table.shape[1], "max_seq_len beyond the block table"
    max_pages = max(1, max_pages)
    if pages_per_split is None:
        pages_per_split = default_pages_per_split(batch, num_kv_heads, max_pages, device)
    splits = -(-max_pages // pages_per_split)

    m = torch.empty(batch, num_kv_heads, splits, group, dtype=f32, device=device)
    l_sum = torch.empty_like(m)
    acc = torch.empty(batch, num_kv_heads, splits, group, head_size, dtype=f32, device=device)
    block_table = block_table.to(torch.int32)
    lens = seq_lens.to(torch.int32).contiguous()
    dot_fp32 = _interpreted() or pages.dtype == f32
    if batch:
        _dense_pass[(batch, num_kv_heads, splits)](
            query, pages, block_table, lens, m, l_sum, acc,
            query.stride(0), query.stride(1), pages.stride(0), pages.stride(1), pages.stride(2),
            pages.stride(3), block_table.stride(0), pages_per_split, scale,
            G=group, HEAD_SIZE=head_size, BLOCK=block_size, GP=_pow2(group), DP=_pow2(head_size),
            DOT_FP32=dot_fp32)

    # Combine: one softmax over all splits (an empty split has max -inf and weighs 0).
    m_all = m.amax(dim=2)                                            # [batch, kvh, G]
    m_all = torch.where(torch.isinf(m_all), torch.zeros_like(m_all), m_all)
    weight = torch.exp(m - m_all[:, :, None])                        # [batch, kvh, splits, G]
    total = (l_sum * weight).sum(dim=2)                              # [batch, kvh, G]
    out = (acc * weight[..., None]).sum(dim=2)                       # [batch, kvh, G, head_size]
    out = torch.where(total[..., None] > 0, out / total[..., None], torch.zeros_like(out))
    return out.reshape(batch, num_heads, head_size).to(query.dtype)
