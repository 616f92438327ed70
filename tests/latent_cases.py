"""Random paged AttentionPack caches built directly (no compression, no vLLM): kernel test inputs.

Imports torch and the kernels package only, so the GPU check can use it without the
rest of the project. Pages start as NaN (stale bytes) and only the requests' own rows
are written; block tables are shuffled and their unused entries point at other
requests' blocks; slots are a random subset of a larger pool.

The slots' bases and window rows go into one row arena in shuffled order
(`kernels/slot_rows.py`), so a kernel that ignored the maps would read the wrong rows.

With `int8=True` the same values are stored in the int8 format (`kernels/storage.py`):
records packed as bytes, bases and windows quantized with a scale per row and KV head
(`LatentCase.rows.scales`); stale page rows are random bytes whose K' and V' scales are NaN
and inf.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass

import torch


@dataclass
class LatentCase:
    spec: object
    query: torch.Tensor
    pages: torch.Tensor
    rows: object                # SlotRows: the slots' bases and exact rows
    block_table: torch.Tensor   # [B, max_blocks] int32
    slot_ids: list[int]
    seq_lens: list[int]
    window_lens: list[int]
    block_size: int
    window: int
    scale: float

    def batch(self, kernels, with_index: bool = True, max_compressed_len: int | None = None):
        """The step's DecodeBatch (optionally with a larger padded length, as for a captured graph)."""
        out = kernels.decode_inputs.make_decode_batch(
            self.block_table, self.slot_ids, self.seq_lens, self.window_lens,
            window_size=self.window, block_size=self.block_size, with_index=with_index,
            pad_to=max_compressed_len)
        return out


def column_tables(rank_k: int, rank_v: int, partial_k: bool, partial_v: bool, num_groups: int = 2):
    """(group_cols_k, group_cols_v) per (modality, group); partial tables differ by modality."""
    def table(rank, partial):
        if not partial:
            return tuple(tuple([rank] * num_groups) for _ in range(2))
        text = [rank] + [max(1, math.ceil(rank / 4 ** g)) for g in range(1, num_groups)]
        image = [rank] + [max(1, math.ceil(rank / 2 ** g)) for g in range(1, num_groups)]
        return (tuple(text), tuple(image))  # rows: TEXT (0), IMAGE (1)
    return table(rank_k, partial_k), table(rank_v, partial_v)


def shuffled_rows(slot_rows, rows, gen: torch.Generator):
    """`rows` (a SlotRows) with its arena rows past the zero row in random order, maps to match."""
    count = rows.arena.shape[0]
    order = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(count - 1, generator=gen)])
    new_at = torch.empty_like(order)
    new_at[order] = torch.arange(count)          # old arena row -> new arena row
    new_at = new_at.to(rows.arena.device)
    maps = {name: new_at[rows.map(name)] for name in slot_rows.MAP_NAMES}
    order = order.to(rows.arena.device)
    scales = None if rows.scales is None else rows.scales[order]
    return slot_rows.SlotRows(rows.arena[order], scales, **maps)


def _stale_int8_pages(shape, layout, gen: torch.Generator) -> torch.Tensor:
    """int8 pages of random bytes whose K' scales are NaN and V' scales inf in every row."""
    pages = torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
    for offset, value in ((layout.k_scale_offset, float("nan")), (layout.v_scale_offset, float("inf"))):
        pages[..., offset:offset + 4] = torch.tensor([value]).view(torch.int8)
    return pages


def random_case(kernels, *, compressed_lens, window_lens, num_heads=4, num_kv_heads=2, head_size=16,
                rank_k=16, rank_v=16, block_size=8, window=4, has_image=True, partial_k=False,
                partial_v=False, num_groups=2, dtype=torch.float32, device="cpu", seed=0,
                extra_slots=2, window_stale=0.0, num_blocks=None, max_blocks=None,
                num_slots=None, int8=False) -> LatentCase:
    """A batch of requests with `compressed_lens` records and `window_lens` window rows each.

    Window rows past a request's length hold `window_stale` (finite by default: the
    PyTorch path multiplies them by zero probabilities; with int8, their scales do).
    `num_blocks`, `max_blocks` and `num_slots` fix the shapes (two cases of the same
    shapes feed one captured graph). `int8`: the int8 storage format of the same values
    (`dtype` is then the query's).
    """
    K = kernels
    storage = importlib.import_module(K.layout.__package__ + ".storage")  # `kernels` may be a namespace
    slot_rows = importlib.import_module(K.layout.__package__ + ".slot_rows")
    gen = torch.Generator().manual_seed(seed)
    layout = K.layout.RecordLayout(rank_k=rank_k, rank_v=rank_v, int8=int8)
    cols_k, cols_v = column_tables(rank_k, rank_v, partial_k, partial_v, num_groups)
    planes = 2 if has_image else 1
    spec = K.decode_inputs.LatentSpec(layout, planes, cols_k, cols_v)
    batch = len(compressed_lens)
    kv_width = num_kv_heads * head_size

    blocks = [-(-c // block_size) for c in compressed_lens]
    max_blocks = max_blocks or max(blocks + [1]) + 1
    num_blocks = num_blocks or sum(blocks) + 3
    assert max_blocks >= max(blocks + [0]) and num_blocks >= sum(blocks), "shapes too small"
    page_shape = (num_blocks, block_size, layout.width)
    pages = _stale_int8_pages(page_shape, layout, gen) if int8 else torch.full(page_shape, float("nan"))
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    block_table = torch.empty(batch, max_blocks, dtype=torch.int32)
    used = 0
    for b, (clen, nb) in enumerate(zip(compressed_lens, blocks)):
        own = perm[used:used + nb]
        used += nb
        spare = torch.randint(0, num_blocks, (max_blocks - nb,), generator=gen).tolist()
        block_table[b] = torch.tensor(own + spare, dtype=torch.int32)
        k = torch.randn(clen, rank_k, generator=gen)
        v = torch.randn(clen, rank_v, generator=gen)
        importance = torch.rand(clen, generator=gen)
        modality = (torch.randint(0, 2, (clen,), generator=gen) if has_image
                    else torch.zeros(clen, dtype=torch.long))
        group = torch.randint(0, num_groups, (clen,), generator=gen)
        records = storage.pack_records(layout, pages.dtype, k, v, importance,
                                       K.layout.encode_flags(modality, group))
        pos = torch.arange(clen)
        rows = torch.tensor(own, dtype=torch.long)[pos // block_size] if clen else pos
        pages[rows, pos % block_size] = records

    num_slots = num_slots or batch + extra_slots
    slot_ids = torch.randperm(num_slots, generator=gen)[:batch].tolist()
    basis_k = torch.randn(num_slots, planes, rank_k, kv_width, generator=gen) / head_size ** 0.5
    basis_v = torch.randn(num_slots, planes, rank_v, kv_width, generator=gen) / head_size ** 0.5
    window_k = torch.randn(num_slots, window, kv_width, generator=gen)
    window_v = torch.randn(num_slots, window, kv_width, generator=gen)
    by_name = dict(basis_k=basis_k, basis_v=basis_v, window_k=window_k, window_v=window_v)
    scales = None
    if int8:
        quantized = {name: storage.quantize(t, num_kv_heads) for name, t in by_name.items()}
        by_name = {name: q for name, (q, _) in quantized.items()}
        scales = {name: s for name, (_, s) in quantized.items()}
        stale = (scales["window_k"], scales["window_v"])   # a stale row's scale makes it stale
    else:
        stale = (window_k, window_v)
    for b, wlen in enumerate(window_lens):
        for t in stale:
            t[slot_ids[b], wlen:] = window_stale
    query = torch.randn(batch, num_heads, head_size, generator=gen)
    to = dict(dtype=dtype, device=device)
    stored = dict(device=device) if int8 else to   # int8 rows and pages keep their dtype
    rows = shuffled_rows(slot_rows, slot_rows.slot_major_rows(**by_name, scales=scales), gen)
    rows = rows.map_tensors(lambda t: t.to(device)).with_arena(rows.arena.to(**stored), None if rows.scales is None
                                                                  else rows.scales.to(device))
    return LatentCase(
        spec=spec, query=query.to(**to), pages=pages.to(**stored), rows=rows,
        block_table=block_table.to(device), slot_ids=slot_ids,
        seq_lens=[c + w for c, w in zip(compressed_lens, window_lens)], window_lens=list(window_lens),
        block_size=block_size, window=window, scale=head_size ** -0.5)


# --------------------------------------------------------------------------- CUDA graph replay

STATIC_FIELDS = ("query", "pages")
BATCH_FIELDS = ("block_table", "slot_ids", "seq_lens", "compressed_lens", "window_lens", "new_window_rows")


def decode_step(kernels, case: LatentCase, batch, k_new, v_new, need_probs: bool):
    """The part of a decode step a CUDA graph captures: write the new token's K/V into its
    window row, then attend (window lengths in `batch` already count it)."""
    rows = case.rows
    rows.arena[rows.window_k[batch.slot_ids, batch.new_window_rows]] = k_new
    rows.arena[rows.window_v[batch.slot_ids, batch.new_window_rows]] = v_new
    return kernels.latent_decode_triton.latent_decode_attention_triton(
        case.query, case.pages, rows, batch, case.spec, case.scale, need_probs)


def _copy_rows(rows):
    """A SlotRows with its own copies of every tensor."""
    return rows.map_tensors(lambda t: t.clone())


def _copy_rows_into(target, source) -> None:
    for a, b in zip(target.tensors(), source.tensors()):
        a.copy_(b)


def capture(fn):
    """(graph, static outputs) of one call of `fn` captured in a CUDA graph, after a warm-up
    call on a side stream (compiles the kernels, caches the column table)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def replay_against_eager(kernels, cases: list[LatentCase], new_kv, bound: int, need_probs: bool,
                         use_graph: bool = True) -> list[dict]:
    """Capture `decode_step` once on copies of `cases[0]` (padded length `bound`), then for
    every case copy its inputs into the captured buffers, replay, and run the same step
    eagerly on the case itself. Without `use_graph` (CPU) the captured call is simply run
    again on the buffers, which checks everything but the capture.

    Per case: graph (replayed outputs), eager (eager outputs), reference (the PyTorch
    path after the same append), window_equal (the appended windows agree).
    """
    first = cases[0]
    static = dataclasses.replace(first, rows=_copy_rows(first.rows),
                                 **{f: getattr(first, f).clone() for f in STATIC_FIELDS})
    batch0 = first.batch(kernels, with_index=False, max_compressed_len=bound)
    static_batch = dataclasses.replace(batch0, **{f: getattr(batch0, f).clone() for f in BATCH_FIELDS})
    static_kv = [t.clone() for t in new_kv[0]]

    def run():
        return decode_step(kernels, static, static_batch, *static_kv, need_probs)

    graph, outputs = capture(run) if use_graph else (None, None)
    results = []
    for case, (k_new, v_new) in zip(cases, new_kv):
        eager_case = dataclasses.replace(case, rows=_copy_rows(case.rows))
        eager_batch = case.batch(kernels, with_index=False, max_compressed_len=bound)
        eager = decode_step(kernels, eager_case, eager_batch, k_new, v_new, need_probs)
        for f in STATIC_FIELDS:
            getattr(static, f).copy_(getattr(case, f))
        _copy_rows_into(static.rows, case.rows)
        for f in BATCH_FIELDS:
            getattr(static_batch, f).copy_(getattr(eager_batch, f))
        static_kv[0].copy_(k_new)
        static_kv[1].copy_(v_new)
        if use_graph:
            graph.replay()
            torch.cuda.synchronize()
            replayed = tuple(None if t is None else t.clone() for t in outputs)
        else:
            replayed = run()
        reference = kernels.latent_decode_torch.latent_decode_attention(
            eager_case.query, eager_case.pages, eager_case.rows, eager_case.batch(kernels, max_compressed_len=bound),
            eager_case.spec, eager_case.scale, need_probs=need_probs)
        window_equal = torch.equal(static.rows.arena, eager_case.rows.arena)
        results.append(dict(graph=replayed, eager=eager, reference=reference, window_equal=window_equal))
    return results


def same_outputs(a, b) -> bool:
    """Bitwise equality of two (out, probs, window probs) results (None where absent)."""
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a, b))


# Kernel-against-PyTorch cases (Triton and the compiled CPU kernel).
C_LENS = [0, 5, 23, 40]   # no compressed token, mid-page, several pages, several tiles
W_LENS = [1, 4, 2, 3]     # 1 .. window
# name: (num_heads, num_kv_heads, head_size, rank_k, rank_v, block_size, has_image, partial, dtype, need_probs)
CASES = {
    "mha-image":        (4, 4, 16, 16, 16, 8, True, "", torch.float32, True),
    "mha-image-pkv":    (4, 4, 16, 16, 16, 8, True, "kv", torch.float16, False),
    "mha-text":         (4, 4, 16, 16, 16, 8, False, "", torch.float16, True),
    "mha-text-pv":      (4, 4, 16, 16, 16, 8, False, "v", torch.float32, False),
    "gqa-image":        (8, 2, 32, 24, 20, 16, True, "", torch.float16, False),
    "gqa-image-pkv":    (8, 2, 32, 24, 20, 16, True, "kv", torch.float32, True),
    "gqa-image-pv-b4":  (8, 2, 32, 24, 20, 4, True, "v", torch.float16, True),
    "gqa-text-pkv":     (8, 2, 32, 24, 20, 16, False, "kv", torch.float16, True),
    "gqa-text":         (8, 2, 32, 24, 20, 8, False, "", torch.float32, False),
    "gqa-odd-image-pk": (6, 3, 24, 16, 32, 8, True, "k", torch.float32, True),
    "mqa-text-pkv":     (4, 1, 32, 32, 16, 16, False, "kv", torch.float32, True),
    # Ranks that are not powers of two, padded to one: 48 and 40 to 64.
    "gqa-text-split":       (8, 2, 32, 48, 40, 16, False, "", torch.float16, True),
    "gqa-image-split-pkv":  (8, 2, 32, 40, 48, 8, True, "kv", torch.float32, True),
}
# int8 storage, same fields (dtype: the query's). The odd case's 13 + 6 columns put padding
# before the record's scales and V' at an offset that is not a multiple of 4.
INT8_CASES = {
    "int8-mha-image":         (4, 4, 16, 16, 16, 8, True, "", torch.float32, True),
    "int8-mha-text-pkv":      (4, 4, 16, 16, 16, 8, False, "kv", torch.float16, True),
    "int8-gqa-image-pv":      (8, 2, 32, 24, 20, 16, True, "v", torch.float16, False),
    "int8-gqa-odd-image-pkv": (6, 3, 24, 13, 6, 8, True, "kv", torch.float32, True),
    "int8-mqa-text":          (4, 1, 32, 32, 16, 16, False, "", torch.bfloat16, True),
    "int8-gqa-image-split-pkv": (8, 4, 32, 80, 96, 16, True, "kv", torch.float16, True),   # the defaults' rank 80
}
