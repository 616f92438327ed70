"""Latent-space paged decode attention in Triton: a few launches, no host syncs.

Same contract and results as `latent_decode_torch.latent_decode_attention` (see there
for the math). Everything a kernel needs is read by index inside the kernel: the
request's bases and window rows through the slot-row maps (`kernels/slot_rows.py`),
its records through the block table, its
lengths from `DecodeBatch`'s device tensors. The host only computes grid sizes from
Python values (batch size, `max_compressed_len`, the `LatentSpec`), so the whole call
is a fixed sequence of launches that a `torch.cuda.CUDAGraph` can capture:

1. `_project_queries`, grid (batch, modality x KV head): q_lat[b, m, h] =
   scale * D_k[slot, m][:, kvh] q_h for the G query heads of the KV head, reading the
   basis tile in place. The image plane is launched only when the spec has images.
2. `_latent_pass`, grid (batch, splits): every request's compressed positions are cut
   into `splits` equal runs of tiles (a tile is TILE positions, gathered through the
   block table from as many pages as it spans), so every batch size gets about
   PROGRAMS_PER_SM programs per SM. A program scores each record once for all query
   heads (K' against the text and, with images, the image plane; the record's flag
   picks one), keeps an online softmax per head and accumulates V' in rank space into
   one accumulator per modality. Partial rank: masked loads of the first
   cols[modality, group] columns, switched on per spec (constexpr).
3. `_combine`, grid (batch, KV head): merges the splits' partial softmaxes with the
   request's full-rank window tokens (scored and summed here, the window being the
   last "split" of the same softmax), normalises, and applies D_v[slot, m][:, kvh]
   to each modality's rank-space accumulator. Writes the output; with need_probs
   also the final max and sum per head and the window probabilities summed over the
   KV head's query heads.
4. With need_probs, `_probs_pass`, grid (batch, splits): re-scores the records against
   the final max and sum (K' and flags read again, V' not) and writes the
   head-averaged probabilities, zeros at padded positions; split 0 also sums the
   window probabilities over KV heads.

Launches per call: 3, or 4 with need_probs; the host allocates one float32 workspace,
the output, and the two probability tensors with need_probs.

int8 storage (`spec.layout.int8`): the same launches, switched at compile
time (INT8; the 16-bit kernels are unchanged). Records are bytes: K' and V' int8 with a
float32 scale each, loaded as float32 from their 4-byte aligned offsets (the host
asserts the alignment), and a one-byte flags field; bases and window rows are int8 with
a float32 scale per row and KV head (`rows.scales`). Every int8 tile is scaled in float32 right after
its load (`_load_factors`, `_load_rows`), then multiplied like a 16-bit one: in float32
under the interpreter (the PyTorch path's math on the same stored values), in the
model's dtype on a GPU.

Under TRITON_INTERPRET=1 (CPU) every dot product runs in float32 (the interpreter's
bf16 dot is wrong); on a GPU fp16/bf16 operands are multiplied in their own dtype with
float32 accumulation, and float32 operands in full precision ("ieee", not TF32). The
operand dtype (DOT_DTYPE) is the cache dtype, or the model's (the query's) with int8
storage.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_inputs import DecodeBatch, LatentSpec
from .layout import FLOAT32_BYTES, IMAGE, TEXT
from .slot_rows import MAP_NAMES, SlotRows
from .triton_common import interpreted as _interpreted, mm as _mm, pow2 as _pow2, sm_count as _sm_count

# Tuning knobs (plain Python values, read at every call; benchmarks may change them).
PROGRAMS_PER_SM = 4          # splits are chosen so that the latent pass has about this many programs per SM
TUNING = {
    "tile": 32,              # compressed positions per latent-pass iteration (a power of 2, >= 16)
    "pass_warps": 4,
    "combine_warps": 4,
    "project_warps": 4,
}
INTERPRETER_TILE = 16        # small tiles under the interpreter: several per request in tests
INTERPRETER_SPLITS = 3       # splits per request under the interpreter (exercises the merge)

TEXT_PLANE = tl.constexpr(TEXT)
IMAGE_PLANE = tl.constexpr(IMAGE)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}  # DOT_DTYPE


# --------------------------------------------------------------------------- shared helpers

@triton.jit
def _operand(x, like, DOT_FP32: tl.constexpr):
    """x cast to the dtype `_mm` multiplies it in next to `like` (a tensor of the cache dtype)."""
    if DOT_FP32:
        out = x.to(tl.float32)
    else:
        out = x.to(like.dtype)
    return out


@triton.jit
def _dequantize(x, scale, DOT_DTYPE: tl.constexpr):
    """int8 values times their float32 scales (broadcast), as a dot operand."""
    return (x.to(tl.float32) * scale).to(DOT_DTYPE)


@triton.jit
def _load_rows(at, mask, scale_at, row_mask, INT8: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """A tile [ROWS, DP] of one KV head's columns of slot rows (a basis or the window).

    INT8: the rows are int8 and `scale_at` [ROWS] points at their scales (one per row and
    KV head); the tile comes back scaled, in DOT_DTYPE. Otherwise `scale_at` is not read."""
    x = tl.load(at, mask=mask, other=0.0)
    if INT8:
        x = _dequantize(x, tl.load(scale_at, mask=row_mask, other=0.0)[:, None], DOT_DTYPE)
    return x


@triton.jit
def _mapped_rows(rows_ptr, row_scales_ptr, map_at, idx, idx_mask, d, d_mask, kvh, stride_row, stride_srow,
                 HEAD_SIZE: tl.constexpr, INT8: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """A tile [len(idx), DP] of KV head kvh's columns of the logical slot rows `idx`, found
    through the map row at `map_at` (their arena rows; masked ones read the zero row)."""
    at = tl.load(map_at + idx, mask=idx_mask, other=0)
    return _load_rows(rows_ptr + at[:, None] * stride_row + kvh * HEAD_SIZE + d[None, :],
                      idx_mask[:, None] & d_mask[None, :], row_scales_ptr + at * stride_srow + kvh, idx_mask,
                      INT8, DOT_DTYPE)


@triton.jit
def _tile_range(clen, split, num_splits, TILE: tl.constexpr):
    """[first, last) tiles of a request's `clen` positions that split `split` of `num_splits` walks."""
    num_tiles = tl.cdiv(clen, TILE)
    per_split = tl.cdiv(num_tiles, num_splits)
    first = split * per_split
    return first, tl.minimum(first + per_split, num_tiles)


@triton.jit
def _tile_rows(pages_ptr, bt_row_ptr, pos, clen, stride_page, stride_row, BLOCK: tl.constexpr,
               ALIGN: tl.constexpr):
    """Record pointers [TILE] of positions `pos` through one request's block table, and validity.

    ALIGN: a power of 2 dividing both strides (and the fields' offsets), so that the
    compiler may load that many elements of a record at once."""
    valid = pos < clen
    block = tl.load(bt_row_ptr + pos // BLOCK, mask=valid, other=0).to(tl.int64)
    offset = tl.multiple_of(block * stride_page + (pos % BLOCK) * stride_row, ALIGN)
    return pages_ptr + offset, valid


@triton.jit
def _record_meta(rows, valid, cols_ptr, TILE: tl.constexpr, FLAGS_OFF: tl.constexpr,
                 NUM_GROUPS: tl.constexpr, NEED_FLAGS: tl.constexpr,
                 PARTIAL_K: tl.constexpr, PARTIAL_V: tl.constexpr):
    """Per token: image or not, K' and V' columns read (cols table: [k|v][modality][group])."""
    if NEED_FLAGS:
        flags = tl.load(rows + FLAGS_OFF, mask=valid, other=0.0).to(tl.int32)
    else:
        flags = tl.zeros([TILE], tl.int32)
    modality = flags % 2
    entry = modality * NUM_GROUPS + flags // 2
    is_image = (modality == IMAGE_PLANE) & valid
    cols_k = flags
    cols_v = flags
    if PARTIAL_K:
        cols_k = tl.load(cols_ptr + entry, mask=valid, other=0)
    if PARTIAL_V:
        cols_v = tl.load(cols_ptr + 2 * NUM_GROUPS + entry, mask=valid, other=0)
    return is_image, cols_k, cols_v


@triton.jit
def _load_factors(rows, valid, cols, OFF: tl.constexpr, RANK: tl.constexpr, RP: tl.constexpr,
                  PARTIAL: tl.constexpr, INT8: tl.constexpr, SCALE_OFF: tl.constexpr,
                  DOT_DTYPE: tl.constexpr):
    """[TILE, RP] factors at record offset OFF; a token's columns past `cols` (partial rank),
    the padding past RANK and invalid rows (stale bytes, maybe NaN) are never loaded.

    INT8: int8 factors times the record's float32 scale at byte SCALE_OFF (a multiple of 4
    in a row whose address is one too, so a plain float32 load), in DOT_DTYPE."""
    c = tl.arange(0, RP)
    mask = valid[:, None] & (c[None, :] < RANK)
    if PARTIAL:
        mask = mask & (c[None, :] < cols[:, None])
    fac = tl.load(rows[:, None] + OFF + c[None, :], mask=mask, other=0.0)
    if INT8:
        scale = tl.load((rows + SCALE_OFF).to(tl.pointer_type(tl.float32)), mask=valid, other=0.0)
        fac = _dequantize(fac, scale[:, None], DOT_DTYPE)
    return fac


@triton.jit
def _load_queries(q_lat_ptr, b, HP: tl.constexpr, RKP: tl.constexpr, NUM_HEADS: tl.constexpr,
                  RANK_K: tl.constexpr, M: tl.constexpr, HAS_IMAGE: tl.constexpr):
    """Projected queries [HP, RKP] of request b, text and image planes (float32)."""
    h = tl.arange(0, HP)
    r = tl.arange(0, RKP)
    mask = (h[:, None] < NUM_HEADS) & (r[None, :] < RANK_K)
    base = q_lat_ptr + b.to(tl.int64) * (M * NUM_HEADS * RANK_K) + h[:, None] * RANK_K + r[None, :]
    q_txt = tl.load(base + TEXT_PLANE * NUM_HEADS * RANK_K, mask=mask, other=0.0)
    q_img = q_txt
    if HAS_IMAGE:
        q_img = tl.load(base + IMAGE_PLANE * NUM_HEADS * RANK_K, mask=mask, other=0.0)
    return q_txt, q_img


@triton.jit
def _tile_scores(k_fac, q_txt, q_img, is_image, valid, HAS_IMAGE: tl.constexpr, DOT_FP32: tl.constexpr):
    """Scores [TILE, HP] (scale already in q_lat); -inf on invalid rows."""
    scores = _mm(k_fac, tl.trans(q_txt), DOT_FP32)
    if HAS_IMAGE:
        scores = tl.where(is_image[:, None], _mm(k_fac, tl.trans(q_img), DOT_FP32), scores)
    return tl.where(valid[:, None], scores, float("-inf"))


@triton.jit
def _rescale(m_old, m_new):
    """exp(m_old - m_new) with -inf handled (an empty running softmax weighs 0); and the safe max."""
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return tl.exp(m_old - m_safe), m_safe


# --------------------------------------------------------------------------- kernels

@triton.jit
def _project_queries(
    query_ptr, rows_ptr, row_scales_ptr, basis_map_ptr, slots_ptr, q_lat_ptr,
    stride_qb, stride_qh, stride_row, stride_srow, stride_ms, stride_mm, scale,
    NUM_HEADS: tl.constexpr, G: tl.constexpr, HEAD_SIZE: tl.constexpr, RANK_K: tl.constexpr,
    M: tl.constexpr, NUM_KV: tl.constexpr,
    GP: tl.constexpr, DP: tl.constexpr, RKP: tl.constexpr,
    INT8: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0)
    mk = tl.program_id(1)               # plane * NUM_KV + kv head
    plane = mk // NUM_KV
    kvh = mk % NUM_KV
    slot = tl.load(slots_ptr + b).to(tl.int64)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    r = tl.arange(0, RKP)
    heads = kvh * G + g
    g_mask = g < G
    d_mask = d < HEAD_SIZE
    q = tl.load(query_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)                    # [GP, DP]
    basis = _mapped_rows(rows_ptr, row_scales_ptr, basis_map_ptr + slot * stride_ms + plane * stride_mm, r,
                         r < RANK_K, d, d_mask, kvh, stride_row, stride_srow, HEAD_SIZE, INT8, DOT_DTYPE)  # [RKP, DP]
    q_lat = _mm(_operand(q, basis, DOT_FP32), tl.trans(basis), DOT_FP32) * scale       # [GP, RKP]
    out = q_lat_ptr + ((b.to(tl.int64) * M + plane) * NUM_HEADS + heads[:, None]) * RANK_K + r[None, :]
    tl.store(out, q_lat, mask=g_mask[:, None] & (r[None, :] < RANK_K))


@triton.jit
def _latent_pass(
    q_lat_ptr, pages_ptr, block_table_ptr, clens_ptr, cols_ptr, ws_ptr,
    off_m, off_l, off_acc,
    stride_page, stride_row, stride_bt,
    NUM_HEADS: tl.constexpr, RANK_K: tl.constexpr, RANK_V: tl.constexpr, M: tl.constexpr,
    HP: tl.constexpr, RKP: tl.constexpr, RVP: tl.constexpr,
    K_OFF: tl.constexpr, V_OFF: tl.constexpr, FLAGS_OFF: tl.constexpr, NUM_GROUPS: tl.constexpr,
    K_SCALE_OFF: tl.constexpr, V_SCALE_OFF: tl.constexpr,
    BLOCK: tl.constexpr, TILE: tl.constexpr, ALIGN: tl.constexpr,
    HAS_IMAGE: tl.constexpr, NEED_FLAGS: tl.constexpr, PARTIAL_K: tl.constexpr, PARTIAL_V: tl.constexpr,
    INT8: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    clen = tl.load(clens_ptr + b)
    first, last = _tile_range(clen, split, num_splits, TILE)
    bt_row = block_table_ptr + b.to(tl.int64) * stride_bt
    q_txt, q_img = _load_queries(q_lat_ptr, b, HP, RKP, NUM_HEADS, RANK_K, M, HAS_IMAGE)
    q_txt = q_txt.to(DOT_DTYPE)   # dot operands in the cache dtype (the model's with int8 storage)
    q_img = q_img.to(DOT_DTYPE)

    m = tl.full([HP], float("-inf"), tl.float32)
    l_sum = tl.zeros([HP], tl.float32)
    acc_txt = tl.zeros([HP, RVP], tl.float32)
    acc_img = tl.zeros([HP, RVP], tl.float32)
    offsets = tl.arange(0, TILE)
    for tile in range(first, last):
        rows, valid = _tile_rows(pages_ptr, bt_row, tile * TILE + offsets, clen, stride_page, stride_row, BLOCK,
                                 ALIGN)
        is_image, cols_k, cols_v = _record_meta(rows, valid, cols_ptr, TILE, FLAGS_OFF, NUM_GROUPS,
                                                NEED_FLAGS, PARTIAL_K, PARTIAL_V)
        k_fac = _load_factors(rows, valid, cols_k, K_OFF, RANK_K, RKP, PARTIAL_K, INT8, K_SCALE_OFF, DOT_DTYPE)
        scores = _tile_scores(k_fac, q_txt, q_img, is_image, valid, HAS_IMAGE, DOT_FP32)
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        alpha, m_safe = _rescale(m, m_new)
        p = tl.exp(scores - m_safe[None, :])                                          # [TILE, HP]
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        v_fac = _load_factors(rows, valid, cols_v, V_OFF, RANK_V, RVP, PARTIAL_V, INT8, V_SCALE_OFF,
                              DOT_DTYPE)                                              # [TILE, RVP]
        if HAS_IMAGE:
            p_img = tl.where(is_image[:, None], p, 0.0)
            acc_img = acc_img * alpha[:, None] + _mm(tl.trans(_operand(p_img, v_fac, DOT_FP32)), v_fac, DOT_FP32)
            p = tl.where(is_image[:, None], 0.0, p)
        acc_txt = acc_txt * alpha[:, None] + _mm(tl.trans(_operand(p, v_fac, DOT_FP32)), v_fac, DOT_FP32)
        m = m_new

    h = tl.arange(0, HP)
    rv = tl.arange(0, RVP)
    h_mask = h < NUM_HEADS
    row = b.to(tl.int64) * num_splits + split
    tl.store(ws_ptr + off_m + row * NUM_HEADS + h, m, mask=h_mask)
    tl.store(ws_ptr + off_l + row * NUM_HEADS + h, l_sum, mask=h_mask)
    acc_mask = h_mask[:, None] & (rv[None, :] < RANK_V)
    acc_at = ws_ptr + off_acc + ((row * M) * NUM_HEADS + h[:, None]) * RANK_V + rv[None, :]
    tl.store(acc_at + TEXT_PLANE * NUM_HEADS * RANK_V, acc_txt, mask=acc_mask)
    if HAS_IMAGE:
        tl.store(acc_at + IMAGE_PLANE * NUM_HEADS * RANK_V, acc_img, mask=acc_mask)


@triton.jit
def _combine(
    query_ptr, rows_ptr, row_scales_ptr, basis_map_ptr, wk_map_ptr, wv_map_ptr,
    slots_ptr, wlens_ptr, ws_ptr, out_ptr,
    off_m, off_l, off_acc, off_stats, off_wp, num_splits, batch,
    stride_qb, stride_qh, stride_row, stride_srow, stride_ms, stride_mm, stride_wks, stride_wvs,
    stride_ob, stride_oh, scale,
    NUM_HEADS: tl.constexpr, G: tl.constexpr, HEAD_SIZE: tl.constexpr, RANK_V: tl.constexpr,
    M: tl.constexpr, NUM_KV: tl.constexpr, WINDOW: tl.constexpr,
    GP: tl.constexpr, DP: tl.constexpr, RVP: tl.constexpr, WP: tl.constexpr,
    HAS_IMAGE: tl.constexpr, NEED_PROBS: tl.constexpr,
    INT8: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    b64 = b.to(tl.int64)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    wlen = tl.load(wlens_ptr + b)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    rv = tl.arange(0, RVP)
    w = tl.arange(0, WP)
    heads = kvh * G + g
    g_mask = g < G
    d_mask = d < HEAD_SIZE
    rv_mask = rv < RANK_V
    w_mask = w < wlen

    # The splits' partial softmaxes, merged (an empty split has max -inf and weighs 0).
    m_run = tl.full([GP], float("-inf"), tl.float32)
    l_run = tl.zeros([GP], tl.float32)
    acc_txt = tl.zeros([GP, RVP], tl.float32)
    acc_img = tl.zeros([GP, RVP], tl.float32)
    for split in range(num_splits):
        row = b64 * num_splits + split
        m_s = tl.load(ws_ptr + off_m + row * NUM_HEADS + heads, mask=g_mask, other=float("-inf"))
        l_s = tl.load(ws_ptr + off_l + row * NUM_HEADS + heads, mask=g_mask, other=0.0)
        m_new = tl.maximum(m_run, m_s)
        a_run, m_safe = _rescale(m_run, m_new)
        a_s = tl.exp(m_s - m_safe)
        l_run = l_run * a_run + l_s * a_s
        used = (g_mask & (m_s > float("-inf")))[:, None] & rv_mask[None, :]
        acc_at = ws_ptr + off_acc + ((row * M) * NUM_HEADS + heads[:, None]) * RANK_V + rv[None, :]
        acc_txt = acc_txt * a_run[:, None] + a_s[:, None] * tl.load(
            acc_at + TEXT_PLANE * NUM_HEADS * RANK_V, mask=used, other=0.0)
        if HAS_IMAGE:
            acc_img = acc_img * a_run[:, None] + a_s[:, None] * tl.load(
                acc_at + IMAGE_PLANE * NUM_HEADS * RANK_V, mask=used, other=0.0)
        m_run = m_new

    # The window's full-rank tokens join the same softmax.
    q = tl.load(query_ptr + b64 * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)                    # [GP, DP]
    w_keys = _mapped_rows(rows_ptr, row_scales_ptr, wk_map_ptr + slot * stride_wks, w, w_mask, d, d_mask, kvh,
                          stride_row, stride_srow, HEAD_SIZE, INT8, DOT_DTYPE)        # [WP, DP]
    w_scores = _mm(_operand(q, w_keys, DOT_FP32), tl.trans(w_keys), DOT_FP32) * scale  # [GP, WP]
    w_scores = tl.where(w_mask[None, :], w_scores, float("-inf"))
    m_fin = tl.maximum(m_run, tl.max(w_scores, axis=1))
    a_run, m_safe = _rescale(m_run, m_fin)
    p_w = tl.exp(w_scores - m_safe[:, None])
    l_fin = l_run * a_run + tl.sum(p_w, axis=1)
    inv = tl.where(l_fin > 0.0, 1.0 / tl.where(l_fin > 0.0, l_fin, 1.0), 0.0)
    p_w = p_w * inv[:, None]
    w_values = _mapped_rows(rows_ptr, row_scales_ptr, wv_map_ptr + slot * stride_wvs, w, w_mask, d, d_mask, kvh,
                            stride_row, stride_srow, HEAD_SIZE, INT8, DOT_DTYPE)
    out = _mm(_operand(p_w, w_values, DOT_FP32), w_values, DOT_FP32)                   # [GP, DP]

    # Rank space -> head space: one D_v product per modality (accumulators normalised first).
    coef = (a_run * inv)[:, None]
    plane_at = basis_map_ptr + slot * stride_ms
    basis = _mapped_rows(rows_ptr, row_scales_ptr, plane_at + TEXT_PLANE * stride_mm, rv, rv_mask, d, d_mask, kvh,
                         stride_row, stride_srow, HEAD_SIZE, INT8, DOT_DTYPE)         # [RVP, DP]
    out += _mm(_operand(acc_txt * coef, basis, DOT_FP32), basis, DOT_FP32)
    if HAS_IMAGE:
        basis = _mapped_rows(rows_ptr, row_scales_ptr, plane_at + IMAGE_PLANE * stride_mm, rv, rv_mask, d, d_mask,
                             kvh, stride_row, stride_srow, HEAD_SIZE, INT8, DOT_DTYPE)
        out += _mm(_operand(acc_img * coef, basis, DOT_FP32), basis, DOT_FP32)
    tl.store(out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])

    if NEED_PROBS:
        stats = ws_ptr + off_stats + b64 * NUM_HEADS + heads
        tl.store(stats, m_safe, mask=g_mask)
        tl.store(stats + batch * NUM_HEADS, l_fin, mask=g_mask)
        w_sum = tl.sum(tl.where(g_mask[:, None], p_w, 0.0), axis=0)                   # [WP]
        tl.store(ws_ptr + off_wp + (b64 * NUM_KV + kvh) * WINDOW + w, w_sum, mask=w < WINDOW)


@triton.jit
def _probs_pass(
    q_lat_ptr, pages_ptr, block_table_ptr, clens_ptr, cols_ptr, ws_ptr, probs_ptr, w_probs_ptr,
    off_stats, off_wp, max_len, batch,
    stride_page, stride_row, stride_bt, stride_pb, stride_wb,
    NUM_HEADS: tl.constexpr, RANK_K: tl.constexpr, M: tl.constexpr, NUM_KV: tl.constexpr,
    WINDOW: tl.constexpr, HP: tl.constexpr, RKP: tl.constexpr, KVP: tl.constexpr, WP: tl.constexpr,
    K_OFF: tl.constexpr, FLAGS_OFF: tl.constexpr, NUM_GROUPS: tl.constexpr, K_SCALE_OFF: tl.constexpr,
    BLOCK: tl.constexpr, TILE: tl.constexpr, ALIGN: tl.constexpr,
    HAS_IMAGE: tl.constexpr, NEED_FLAGS: tl.constexpr, PARTIAL_K: tl.constexpr,
    INT8: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b64 = b.to(tl.int64)
    clen = tl.load(clens_ptr + b)
    first, last = _tile_range(clen, split, num_splits, TILE)
    bt_row = block_table_ptr + b64 * stride_bt
    q_txt, q_img = _load_queries(q_lat_ptr, b, HP, RKP, NUM_HEADS, RANK_K, M, HAS_IMAGE)
    q_txt = q_txt.to(DOT_DTYPE)
    q_img = q_img.to(DOT_DTYPE)
    h = tl.arange(0, HP)
    h_mask = h < NUM_HEADS
    stats = ws_ptr + off_stats + b64 * NUM_HEADS + h
    m_fin = tl.load(stats, mask=h_mask, other=0.0)
    l_fin = tl.load(stats + batch * NUM_HEADS, mask=h_mask, other=0.0)
    inv = tl.where(l_fin > 0.0, 1.0 / tl.where(l_fin > 0.0, l_fin, 1.0), 0.0)   # 0 on padded heads
    offsets = tl.arange(0, TILE)
    row_out = probs_ptr + b64 * stride_pb
    for tile in range(first, last):
        pos = tile * TILE + offsets
        rows, valid = _tile_rows(pages_ptr, bt_row, pos, clen, stride_page, stride_row, BLOCK, ALIGN)
        is_image, cols_k, cols_v = _record_meta(rows, valid, cols_ptr, TILE, FLAGS_OFF, NUM_GROUPS,
                                                NEED_FLAGS, PARTIAL_K, False)
        k_fac = _load_factors(rows, valid, cols_k, K_OFF, RANK_K, RKP, PARTIAL_K, INT8, K_SCALE_OFF, DOT_DTYPE)
        scores = _tile_scores(k_fac, q_txt, q_img, is_image, valid, HAS_IMAGE, DOT_FP32)
        p = tl.exp(scores - m_fin[None, :]) * inv[None, :]                             # [TILE, HP]
        tl.store(row_out + pos, tl.sum(p, axis=1) / NUM_HEADS, mask=pos < max_len)   # 0 past clen

    # Padded positions past the request's tiles: zeros, shared out among the splits.
    own_tiles = tl.cdiv(clen, TILE)
    pad_tiles = tl.maximum(tl.cdiv(max_len, TILE) - own_tiles, 0)
    per_split = tl.cdiv(pad_tiles, num_splits)
    zero_first = own_tiles + split * per_split
    zero_last = tl.minimum(zero_first + per_split, own_tiles + pad_tiles)
    zeros = tl.zeros([TILE], tl.float32)
    for tile in range(zero_first, zero_last):
        pos = tile * TILE + offsets
        tl.store(row_out + pos, zeros, mask=pos < max_len)

    if split == 0:  # the window's probabilities: the KV heads' sums, averaged over all heads
        kv = tl.arange(0, KVP)
        w = tl.arange(0, WP)
        parts = tl.load(ws_ptr + off_wp + (b64 * NUM_KV + kv[:, None]) * WINDOW + w[None, :],
                        mask=(kv[:, None] < NUM_KV) & (w[None, :] < WINDOW), other=0.0)
        tl.store(w_probs_ptr + b64 * stride_wb + w, tl.sum(parts, axis=0) / NUM_HEADS, mask=w < WINDOW)


# --------------------------------------------------------------------------- host side

_COLS: dict = {}
_PLANS: dict = {}


def column_table(spec: LatentSpec, device: torch.device) -> torch.Tensor:
    """[2 (k, v), 2 (modality), num_groups] int32 columns read, made once per (spec, device).

    Make it before a CUDA graph capture (a warm-up call does): building it copies
    from the host.
    """
    key = (spec, device)
    table = _COLS.get(key)
    if table is None:
        table = torch.tensor([spec.group_cols_k, spec.group_cols_v], dtype=torch.int32, device=device)
        _COLS[key] = table
    return table


def num_splits(batch: int, max_compressed_len: int, tile: int, device: torch.device) -> int:
    """Splits per request: about PROGRAMS_PER_SM programs per SM on CUDA, never more than tiles."""
    tiles = max(1, -(-max_compressed_len // tile))
    if device.type == "cuda" and not _interpreted():
        target = PROGRAMS_PER_SM * _sm_count(device)
        splits = -(-target // max(1, batch))
    else:
        splits = INTERPRETER_SPLITS
    return max(1, min(tiles, splits))


def _align(n: int) -> int:
    return -(-n // 16) * 16


def _record_alignment(pages: torch.Tensor, layout) -> int:
    """Largest power of 2 (at most 16 bytes' worth) dividing the pages' strides, the K' and V'
    offsets and the pages' address, in elements."""
    item = pages.element_size()
    align = max(1, 16 // item)
    for n in (pages.stride(0), pages.stride(1), layout.k_offset, layout.v_offset, pages.data_ptr() // item):
        while align > 1 and n % align:
            align //= 2
    return align


def _check_rows(query, pages, rows: SlotRows, layout, planes: int, num_kv: int) -> None:
    """The slot rows: an arena [rows, kv_width] with unit stride along a row, int64 maps of
    the plan's shape, and with int8 storage int8 pages and arena, float32 scales
    [rows, num_kv_heads], and records whose float32 scales are 4-byte aligned."""
    assert rows.arena.dim() == 2 and rows.arena.stride(-1) == 1, "slot rows: an arena [rows, kv_width]"
    assert rows.basis_k.shape[1] >= planes and rows.basis_k.shape[2] == layout.rank_k, \
        "basis_k map: [slots, M, rank_k]"
    assert rows.basis_v.shape[1] >= planes and rows.basis_v.shape[2] == layout.rank_v, \
        "basis_v map: [slots, M, rank_v]"
    assert rows.window_k.shape == rows.window_v.shape, "window maps: [slots, exact_rows] both"
    assert all(rows.map(n).dtype == torch.int64 and rows.map(n).stride(-1) == 1 for n in MAP_NAMES), \
        "slot-row maps: int64, unit stride along a row"
    if not layout.int8:
        assert rows.scales is None, "scales are for int8 storage only"
        return
    assert query.dtype in _TL_DTYPES, f"query dtype {query.dtype}: float16, bfloat16 or float32"
    assert pages.dtype == torch.int8 and rows.arena.dtype == torch.int8, "int8 storage: int8 pages and slot rows"
    s = rows.scales
    assert s is not None and s.dtype == torch.float32 and s.shape == (rows.arena.shape[0], num_kv) \
        and s.stride(-1) == 1, f"slot-row scales: float32 [{rows.arena.shape[0]}, {num_kv}], last dim contiguous"
    # The kernels load a record's scales as float32 at row address + offset: every term a multiple of 4.
    assert all(n % FLOAT32_BYTES == 0 for n in (pages.data_ptr(), pages.stride(0), pages.stride(1),
                                                layout.k_scale_offset, layout.v_scale_offset)), \
        "int8 pages: rows and scale offsets must be 4-byte aligned"


class _Plan:
    """Everything about a call that follows from shapes, strides, the spec and host integers:
    grids, workspace layout, scalar arguments and compile-time constants. Cached, so that a
    steady decode step spends its host time on the launches only."""

    def __init__(self, query, pages, rows: SlotRows, batch, spec, scale, need_probs, splits, tile):
        bsz, num_heads, head_size = query.shape
        layout = spec.layout
        planes = spec.num_modalities
        kv_width = rows.kv_width
        num_kv = kv_width // head_size
        group = num_heads // max(1, num_kv)
        window = rows.window_k.shape[1]
        max_len = batch.max_compressed_len
        device = query.device
        assert num_kv * head_size == kv_width and num_kv * group == num_heads, "heads do not divide"
        assert pages.shape[-1] == layout.width, "pages: [num_blocks, block_size, record width]"
        assert query.stride(-1) == pages.stride(-1) == 1, "last dims must be contiguous"
        _check_rows(query, pages, rows, layout, planes, num_kv)
        int8 = layout.int8
        interpreted = _interpreted()
        if tile is None:
            tile = INTERPRETER_TILE if interpreted else TUNING["tile"]
        if splits is None:
            splits = num_splits(bsz, max_len, tile, device)
        partial_k, partial_v, has_image = spec.partial_k, spec.partial_v, spec.has_image
        self.needs_cols = partial_k or partial_v
        self.spec, self.device, self.need_probs = spec, device, need_probs
        self.bsz, self.max_len = bsz, max_len
        self.out_shape = (bsz, num_heads, head_size)
        self.window = window
        self.int8 = int8

        # One float32 workspace: q_lat | m | l | acc | final max and sum | window probs per KV head.
        off_m = _align(bsz * planes * num_heads * layout.rank_k)
        off_l = off_m + _align(bsz * splits * num_heads)
        off_acc = off_l + _align(bsz * splits * num_heads)
        off_stats = off_acc + _align(bsz * splits * planes * num_heads * layout.rank_v)
        off_wp = off_stats + _align(2 * bsz * num_heads)
        self.ws_size = off_wp + (_align(bsz * num_kv * window) if need_probs else 0)

        # Dot operands: the cache dtype, or with int8 storage the model's (int8 tiles are scaled first).
        dot_dtype = query.dtype if int8 else pages.dtype
        dot_fp32 = interpreted or dot_dtype == torch.float32
        dot = dict(INT8=int8, DOT_DTYPE=tl.float32 if dot_fp32 else _TL_DTYPES[dot_dtype], DOT_FP32=dot_fp32)
        gp, dp = _pow2(group), _pow2(head_size)
        hp, rkp, rvp, wp = _pow2(num_heads), _pow2(layout.rank_k), _pow2(layout.rank_v), _pow2(window)
        q_stride, p_stride = query.stride(), pages.stride()
        row_strides = (rows.arena.stride(0), 0 if rows.scales is None else rows.scales.stride(0))
        bt_stride = batch.block_table.stride(0)
        self.grid_project = (bsz, planes * num_kv)
        self.grid_pass = (bsz, splits)
        self.grid_combine = (bsz, num_kv)
        self.project_args = (q_stride[0], q_stride[1], *row_strides, *rows.basis_k.stride()[:2], scale)
        self.project_const = dict(
            NUM_HEADS=num_heads, G=group, HEAD_SIZE=head_size, RANK_K=layout.rank_k, M=planes, NUM_KV=num_kv,
            GP=gp, DP=dp, RKP=rkp, **dot, num_warps=TUNING["project_warps"])
        records = dict(
            NUM_HEADS=num_heads, RANK_K=layout.rank_k, M=planes, HP=hp, RKP=rkp,
            K_OFF=layout.k_offset, FLAGS_OFF=layout.flags_offset, NUM_GROUPS=spec.num_groups,
            K_SCALE_OFF=layout.k_scale_offset if int8 else 0,
            BLOCK=pages.shape[1], TILE=tile, ALIGN=_record_alignment(pages, layout), HAS_IMAGE=has_image,
            NEED_FLAGS=has_image or partial_k or partial_v,
            PARTIAL_K=partial_k, **dot, num_warps=TUNING["pass_warps"])
        self.pass_args = (off_m, off_l, off_acc, p_stride[0], p_stride[1], bt_stride)
        self.pass_const = dict(records, RANK_V=layout.rank_v, RVP=rvp, V_OFF=layout.v_offset, PARTIAL_V=partial_v,
                               V_SCALE_OFF=layout.v_scale_offset if int8 else 0)
        self.combine_args = (
            off_m, off_l, off_acc, off_stats, off_wp, splits, bsz,
            q_stride[0], q_stride[1], *row_strides, *rows.basis_v.stride()[:2], rows.window_k.stride(0),
            rows.window_v.stride(0), num_heads * head_size, head_size, scale)
        self.combine_const = dict(
            NUM_HEADS=num_heads, G=group, HEAD_SIZE=head_size, RANK_V=layout.rank_v, M=planes, NUM_KV=num_kv,
            WINDOW=window, GP=gp, DP=dp, RVP=rvp, WP=wp, HAS_IMAGE=has_image, NEED_PROBS=need_probs,
            **dot, num_warps=TUNING["combine_warps"])
        self.probs_args = (off_stats, off_wp, max_len, bsz, p_stride[0], p_stride[1], bt_stride,
                           max(max_len, 1), window)
        self.probs_const = dict(records, NUM_KV=num_kv, WINDOW=window, KVP=_pow2(num_kv, 1), WP=wp)


def _plan_key(query, pages, rows: SlotRows, batch, spec, scale, need_probs, splits, tile):
    return (spec, query.shape, query.stride(), query.dtype, query.device, pages.shape, pages.stride(), pages.dtype,
            tuple((t.shape, t.stride(), t.dtype) for t in rows.tensors()), rows.scales is None,
            pages.data_ptr() % 16, batch.block_table.stride(0), batch.max_compressed_len, scale,
            need_probs, splits, tile, _interpreted(), PROGRAMS_PER_SM, tuple(TUNING.values()))


def latent_decode_attention_triton(
    query: torch.Tensor,      # [B, num_heads, head_size]
    pages: torch.Tensor,      # [num_blocks, block_size, width] records
    rows: SlotRows,           # the slots' bases and exact rows (arena and maps)
    batch: DecodeBatch,
    spec: LatentSpec,
    scale: float,
    need_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One decode step; same contract and results as `latent_decode_attention`.

    With int8 storage (`spec.layout.int8`) the pages and slot rows are int8, with the rows'
    float32 scales in `rows.scales`.

    Needs only the batch's block table, slot ids, compressed and window lengths and
    `max_compressed_len` (the index tensors may be None). Reads no device value, makes
    no gathered copy: capturable in a CUDA graph (after one warm-up call).
    """
    return _latent_decode(query, pages, rows, batch, spec, scale, need_probs)


def _latent_decode(query, pages, rows: SlotRows, batch, spec, scale, need_probs=False, splits=None, tile=None):
    """`latent_decode_attention_triton` with the split count and tile size open (tests)."""
    key = _plan_key(query, pages, rows, batch, spec, scale, need_probs, splits, tile)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _Plan(query, pages, rows, batch, spec, scale, need_probs, splits, tile)
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[key] = plan
    device = plan.device
    out = torch.empty(plan.out_shape, dtype=query.dtype, device=device)
    probs = w_probs = None
    if need_probs:
        # (never a zero-size buffer for a kernel argument)
        probs = torch.empty(plan.bsz, max(plan.max_len, 1), dtype=torch.float32, device=device)
        if plan.max_len == 0:
            probs = probs[:, :0]
        w_probs = torch.empty(plan.bsz, plan.window, dtype=torch.float32, device=device)
    if plan.bsz == 0:
        return out, probs, w_probs

    ws = torch.empty(plan.ws_size, dtype=torch.float32, device=device)
    cols = column_table(spec, device) if plan.needs_cols else batch.compressed_lens
    block_table, clens = batch.block_table, batch.compressed_lens
    slots = batch.slot_ids
    # 16-bit storage: the arena stands in for the scales (never read)
    row_scales = rows.scales if plan.int8 else rows.arena
    _project_queries[plan.grid_project](query, rows.arena, row_scales, rows.basis_k, slots, ws, *plan.project_args,
                                        **plan.project_const)
    _latent_pass[plan.grid_pass](ws, pages, block_table, clens, cols, ws, *plan.pass_args, **plan.pass_const)
    _combine[plan.grid_combine](query, rows.arena, row_scales, rows.basis_v, rows.window_k, rows.window_v, slots,
                                batch.window_lens, ws, out, *plan.combine_args, **plan.combine_const)
    if need_probs:
        _probs_pass[plan.grid_pass](ws, pages, block_table, clens, cols, ws, probs, w_probs,
                                    *plan.probs_args, **plan.probs_const)
    return out, probs, w_probs
