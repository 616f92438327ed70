"""Dense paged decode attention in Triton: the baseline AttentionPack is measured against.

Built like `latent_decode_triton` so that the comparison is about the bytes read,
not about kernel craft: the same tiled page walk, the same online softmax, the same
split-and-combine, at most two launches and no host sync. The difference is what a page
holds: full K and V of every KV head, vLLM's layout

    pages [num_blocks, block_size, 2, num_kv_heads, head_size]   (K then V)

addressed through a block table, a token at position t of request b living in block
block_table[b, t // block_size], row t % block_size.

1. `_dense_pass` (Triton), grid (batch, num_kv_heads, splits): every request's
   positions are cut into `splits` equal runs of tiles (a tile is TILE positions
   gathered through the block table), with the split count chosen so that the grid
   covers the GPU about PROGRAMS_PER_SM times at every batch size. A program loads the
   G = num_heads / num_kv_heads query heads of its KV head, reads K and V tiles
   [TILE, head_size] and keeps a running max, sum and accumulator per query head, and
   writes them as its split's partials.
2. `_dense_combine` (Triton), grid (batch, num_kv_heads): merges the splits into one
   softmax per head and writes the output. With a single split (large batches) the
   pass writes the output itself and this launch is skipped.

Under TRITON_INTERPRET=1 (CPU) dot products run in float32 (the interpreter's bf16
dot is wrong). On a GPU, fp16/bf16 pages are multiplied in their own dtype with
float32 accumulation, float32 pages in full precision.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import interpreted as _interpreted, mm as _mm, pow2 as _pow2, sm_count as _sm_count

PROGRAMS_PER_SM = 4  # splits are chosen so that the grid fills the GPU about this many times
TUNING = {"tile": 32, "pass_warps": 4, "combine_warps": 4}
INTERPRETER_TILE = 16
INTERPRETER_SPLITS = 3




@triton.jit
def _dense_pass(
    q_ptr,            # [batch, num_heads, head_size] query (last dim contiguous)
    pages_ptr,        # [num_blocks, block_size, 2, num_kv_heads, head_size] K then V
    block_table_ptr,  # [batch, max_blocks] int32
    seq_lens_ptr,     # [batch] int32: tokens of each request
    ws_ptr,           # float32 workspace: m, l [batch, kvh, splits, G]; acc [batch, kvh, splits, G, D]
    out_ptr,          # [batch, num_heads, head_size]: written here when there is one split
    off_l, off_acc,
    stride_qb, stride_qh, stride_block, stride_row, stride_kv, stride_head, stride_bt, stride_ob, stride_oh,
    scale,
    G: tl.constexpr, HEAD_SIZE: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr,
    GP: tl.constexpr, DP: tl.constexpr, DOT_FP32: tl.constexpr, SINGLE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    num_splits = tl.num_programs(2)
    b64 = b.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + b)
    num_tiles = tl.cdiv(seq_len, TILE)
    per_split = tl.cdiv(num_tiles, num_splits)
    first = split * per_split
    last = tl.minimum(first + per_split, num_tiles)

    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    g_mask = g < G
    d_mask = d < HEAD_SIZE
    q = tl.load(q_ptr + b64 * stride_qb + (kvh * G + g)[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)                   # [GP, DP]
    if DOT_FP32:
        q = q.to(tl.float32)
    else:
        q = q.to(pages_ptr.dtype.element_ty)

    m = tl.full([GP], float("-inf"), tl.float32)
    l_sum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    offsets = tl.arange(0, TILE)
    bt_row = block_table_ptr + b64 * stride_bt
    head_ptr = pages_ptr + kvh.to(tl.int64) * stride_head
    for tile in range(first, last):
        pos = tile * TILE + offsets
        valid = pos < seq_len
        block = tl.load(bt_row + pos // BLOCK, mask=valid, other=0).to(tl.int64)
        base = head_ptr + block * stride_block + (pos % BLOCK) * stride_row           # [TILE]
        # Masked: rows past the request hold stale bytes (possibly NaN) of other requests.
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(base[:, None] + d[None, :], mask=kv_mask, other=0.0)            # [TILE, DP]
        scores = _mm(k, tl.trans(q), DOT_FP32) * scale                              # [TILE, GP]
        scores = tl.where(valid[:, None], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(scores - m_safe[None, :])                                        # [TILE, GP]
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        v = tl.load(base[:, None] + stride_kv + d[None, :], mask=kv_mask, other=0.0)  # [TILE, DP]
        if DOT_FP32:
            p_op = p
        else:
            p_op = p.to(v.dtype)
        acc = acc * alpha[:, None] + _mm(tl.trans(p_op), v, DOT_FP32)               # [GP, DP]
        m = m_new

    if SINGLE:  # one split: the program's softmax is the whole softmax; no combine launch
        out = acc * tl.where(l_sum > 0.0, 1.0 / tl.where(l_sum > 0.0, l_sum, 1.0), 0.0)[:, None]
        tl.store(out_ptr + b64 * stride_ob + (kvh * G + g)[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        row = ((b64 * num_kv_heads + kvh) * num_splits + split) * G + g             # [GP]
        tl.store(ws_ptr + row, m, mask=g_mask)
        tl.store(ws_ptr + off_l + row, l_sum, mask=g_mask)
        tl.store(ws_ptr + off_acc + row[:, None] * HEAD_SIZE + d[None, :], acc,
                 mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _dense_combine(
    ws_ptr, out_ptr, off_l, off_acc, num_splits, stride_ob, stride_oh,
    G: tl.constexpr, HEAD_SIZE: tl.constexpr, GP: tl.constexpr, DP: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    num_kv_heads = tl.num_programs(1)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    g_mask = g < G
    out_mask = g_mask[:, None] & (d < HEAD_SIZE)[None, :]
    m_run = tl.full([GP], float("-inf"), tl.float32)
    l_run = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    first_row = (b.to(tl.int64) * num_kv_heads + kvh) * num_splits * G
    for split in range(num_splits):
        row = first_row + split * G + g
        m_s = tl.load(ws_ptr + row, mask=g_mask, other=float("-inf"))
        l_s = tl.load(ws_ptr + off_l + row, mask=g_mask, other=0.0)
        m_new = tl.maximum(m_run, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a_run = tl.exp(m_run - m_safe)
        a_s = tl.exp(m_s - m_safe)
        used = out_mask & (m_s > float("-inf"))[:, None]   # an empty split weighs 0: skip its bytes
        part = tl.load(ws_ptr + off_acc + row[:, None] * HEAD_SIZE + d[None, :], mask=used, other=0.0)
        acc = acc * a_run[:, None] + part * a_s[:, None]
        l_run = l_run * a_run + l_s * a_s
        m_run = m_new
    # a request with no tokens: zeros
    out = acc * tl.where(l_run > 0.0, 1.0 / tl.where(l_run > 0.0, l_run, 1.0), 0.0)[:, None]
    heads = kvh * G + g
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=out_mask)










def default_num_splits(batch: int, num_kv_heads: int, max_tiles: int, device: torch.device) -> int:
    """Splits per (request, KV head): the grid covers the GPU ~PROGRAMS_PER_SM times over."""
    if device.type == "cuda" and not _interpreted():
        splits = -(-PROGRAMS_PER_SM * _sm_count(device) // max(1, batch * num_kv_heads))
    else:
        splits = INTERPRETER_SPLITS  # interpreter: a few splits, to exercise the combine
    return max(1, min(max_tiles, splits))


_PLANS: dict = {}


def _plan(query, pages, block_table, seq_lens, scale, pages_per_split, max_seq_len):
    """Grids, workspace layout, scalar arguments and constants of a call (cached by the caller)."""
    batch, num_heads, head_size = query.shape
    assert pages.dim() == 5 and pages.shape[2] == 2, \
        "pages: [num_blocks, block_size, 2, num_kv_heads, head_size]"
    num_kv_heads = pages.shape[3]
    assert pages.shape[4] == head_size, "pages and query disagree on head_size"
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    block_size = pages.shape[1]
    assert pages.stride(-1) == 1 and query.stride(-1) == 1, "head_size must be contiguous"
    assert block_table.dim() == 2 and block_table.shape[0] == batch, "block_table: [batch, max_blocks]"
    assert seq_lens.shape == (batch,), "seq_lens: [batch]"
    assert query.device == pages.device == block_table.device == seq_lens.device
    group = num_heads // num_kv_heads
    device = query.device
    if max_seq_len is None:
        max_seq_len = block_table.shape[1] * block_size
    else:
        assert -(-max_seq_len // block_size) <= block_table.shape[1], "max_seq_len beyond the block table"
    interpreted = _interpreted()
    tile = INTERPRETER_TILE if interpreted else TUNING["tile"]
    max_tiles = max(1, -(-max_seq_len // tile))
    if pages_per_split is None:
        splits = default_num_splits(batch, num_kv_heads, max_tiles, device)
    else:
        splits = max(1, -(-max(1, -(-max_seq_len // block_size)) // pages_per_split))
    rows = batch * num_kv_heads * splits * group if splits > 1 else 0
    off_l = -(-rows // 16) * 16
    off_acc = 2 * off_l
    gp, dp = _pow2(group), _pow2(head_size)
    qs, ps = query.stride(), pages.stride()
    return dict(
        ws_size=off_acc + rows * head_size, out_shape=(batch, num_heads, head_size), device=device,
        grid_pass=(batch, num_kv_heads, splits), grid_combine=(batch, num_kv_heads),
        single=splits == 1,
        pass_args=(off_l, off_acc, qs[0], qs[1], ps[0], ps[1], ps[2], ps[3], block_table.stride(0),
                   num_heads * head_size, head_size, scale),
        pass_const=dict(G=group, HEAD_SIZE=head_size, BLOCK=block_size, TILE=tile, GP=gp, DP=dp,
                        DOT_FP32=interpreted or pages.dtype == torch.float32, SINGLE=splits == 1,
                        num_warps=TUNING["pass_warps"]),
        combine_args=(off_l, off_acc, splits, num_heads * head_size, head_size),
        combine_const=dict(G=group, HEAD_SIZE=head_size, GP=gp, DP=dp, num_warps=TUNING["combine_warps"]))


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
    the grid (default: the block table's width, which costs no device-to-host sync);
    `pages_per_split` forces the split count to cover that many pages per split. A
    request with no tokens gets a zero output. One or two launches; capturable in a CUDA graph.
    """
    key = (query.shape, query.stride(), query.dtype, query.device, pages.shape, pages.stride(), pages.dtype,
           pages.device, block_table.shape, block_table.stride(0), seq_lens.shape, seq_lens.device, scale,
           pages_per_split, max_seq_len, _interpreted(), PROGRAMS_PER_SM, tuple(TUNING.values()))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(query, pages, block_table, seq_lens, scale, pages_per_split, max_seq_len)
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[key] = plan
    out = torch.empty(plan["out_shape"], dtype=query.dtype, device=plan["device"])
    if plan["out_shape"][0] == 0:
        return out
    # (one split: the output is the only buffer; never a zero-size workspace as an argument)
    ws = torch.empty(plan["ws_size"], dtype=torch.float32, device=plan["device"]) if plan["ws_size"] else out
    if block_table.dtype != torch.int32:
        block_table = block_table.to(torch.int32)
    if seq_lens.dtype != torch.int32:
        seq_lens = seq_lens.to(torch.int32)
    _dense_pass[plan["grid_pass"]](query, pages, block_table, seq_lens, ws, out, *plan["pass_args"],
                                   **plan["pass_const"])
    if not plan["single"]:
        _dense_combine[plan["grid_combine"]](ws, out, *plan["combine_args"], **plan["combine_const"])
    return out
