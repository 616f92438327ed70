"""Build paged AttentionPack caches for tests: random requests, their original K/V, and
the dense oracle over that history."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attentionpack_vllm.config import AttentionPackConfig
from attentionpack_vllm.decode import decode_and_fold, schedule_decode
from attentionpack_vllm.kernels.decode_inputs import make_decode_batch
from attentionpack_vllm.kernels.latent_decode_torch import latent_decode_attention
from attentionpack_vllm.plan import CompressionPlan, RequestTokens
from attentionpack_vllm.prefill import store_tokens
from attentionpack_vllm.slot_pool import SlotPool
from attentionpack_vllm.windows import WindowTracker
from attentionpack_vllm.kernels.reference import dense_attention


# 16-bit storage, named: tests of the math in the model's dtype (int8 has its own tests).
SIXTEEN_BIT = {"storage": "auto"}


def low_rank_rows(num_tokens: int, width: int, rank: int, gen: torch.Generator, noise: float = 0.0):
    """Rows of rank `rank` (plus optional noise): what cached K/V look like."""
    basis = torch.randn(rank, width, generator=gen)
    rows = torch.randn(num_tokens, rank, generator=gen) @ basis / rank ** 0.5
    return rows + noise * torch.randn(num_tokens, width, generator=gen)


@dataclass
class Scenario:
    plan: CompressionPlan
    pages: torch.Tensor
    pool: SlotPool
    block_table: torch.Tensor      # [batch, max_blocks] int32
    slot_ids: torch.Tensor         # [batch] int32
    seq_lens: list[int]
    tracker: WindowTracker
    keys: list[torch.Tensor] = field(default_factory=list)    # original K per request
    values: list[torch.Tensor] = field(default_factory=list)
    is_image: list[torch.Tensor] = field(default_factory=list)
    dtype: torch.dtype = torch.float32  # of the model: queries, keys and values

    @property
    def batch(self) -> int:
        return len(self.seq_lens)

    def exact_lens(self) -> list[int]:
        """Valid exact rows (sinks + window) of every request (host-side, as the decode
        step knows them)."""
        return [self.tracker.length(int(s)) for s in self.slot_ids]

    def window_lens(self) -> list[int]:
        """Valid window rows of every request (the exact rows after the sinks)."""
        return [self.tracker.window_length(int(s)) for s in self.slot_ids]


def build_scenario(config: AttentionPackConfig, *, num_kv_heads: int, head_size: int,
                   prompt_lens: list[int], image_spans: list[list[tuple[int, int]]] | None = None,
                   block_size: int = 16, max_new_tokens: int = 32, dtype=torch.float32,
                   num_slots: int | None = None, seed: int = 0, data_rank: int | None = None,
                   pages_fill: float = 0.0, has_image: bool = True,
                   request_tokens: RequestTokens = RequestTokens()) -> Scenario:
    """Prefill-compress `prompt_lens` requests into fresh pages (blocks shuffled)."""
    gen = torch.Generator().manual_seed(seed)
    plan = CompressionPlan.build(config, num_kv_heads, head_size, has_image=has_image,
                                 request_tokens=request_tokens)
    width = plan.kv_width
    batch = len(prompt_lens)
    max_blocks = -(-(max(prompt_lens) + max_new_tokens) // block_size)
    num_blocks = batch * max_blocks + 3
    shape = (num_blocks, block_size, plan.layout.width)
    if plan.int8:  # rows of bytes; a NaN fill becomes random stale bytes (NaN/inf scales among them)
        pages = (torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8) if pages_fill != pages_fill
                 else torch.full(shape, int(pages_fill), dtype=torch.int8))
    else:
        pages = torch.full(shape, pages_fill, dtype=dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = perm[: batch * max_blocks].view(batch, max_blocks).to(torch.int32)
    num_slots = num_slots or batch + 1
    slot_ids = torch.randperm(num_slots, generator=gen)[:batch].to(torch.int32)
    pool = SlotPool.allocate(plan, num_slots, dtype)
    sc = Scenario(plan, pages, pool, block_table, slot_ids, list(prompt_lens),
                  WindowTracker.for_plan(num_slots, plan), dtype=dtype)
    image_spans = image_spans or [[] for _ in prompt_lens]
    for b, (length, spans) in enumerate(zip(prompt_lens, image_spans)):
        is_image = torch.zeros(length, dtype=torch.bool)
        for start, end in spans:
            is_image[start:end + 1] = True
        rank = data_rank or width
        keys = low_rank_rows(length, width, rank, gen)
        values = low_rank_rows(length, width, rank, gen)
        importance = torch.rand(length, generator=gen)
        pool.reset(int(slot_ids[b]))
        store_tokens(pages, pool, plan, int(slot_ids[b]), block_table[b], 0, 0,  # as prefill_request does
                     keys.to(dtype), values.to(dtype), is_image, importance)
        sc.tracker.prefilled([int(slot_ids[b])], [length])
        sc.keys.append(keys.to(dtype).float())
        sc.values.append(values.to(dtype).float())
        sc.is_image.append(is_image)
    return sc


def run_decode(sc: Scenario, num_heads: int, steps: int, *, seed: int = 1, attention=None,
               oracle: bool = True):
    """Run `steps` decode steps on every request; yields (latent_out, dense_out) per step.

    The dense oracle attends over the original (uncompressed) history.
    """
    gen = torch.Generator().manual_seed(seed)
    head_size, width = sc.plan.head_size, sc.plan.kv_width
    scale = head_size ** -0.5
    dtype = sc.dtype
    kwargs = {} if attention is None else {"attention": attention}
    for _ in range(steps):
        q = torch.randn(sc.batch, num_heads, head_size, generator=gen).to(dtype)
        k = torch.randn(sc.batch, width, generator=gen).to(dtype)
        v = torch.randn(sc.batch, width, generator=gen).to(dtype)
        for b in range(sc.batch):
            sc.keys[b] = torch.cat([sc.keys[b], k[b:b + 1].float()])
            sc.values[b] = torch.cat([sc.values[b], v[b:b + 1].float()])
            sc.is_image[b] = torch.cat([sc.is_image[b], torch.zeros(1, dtype=torch.bool)])
            sc.seq_lens[b] += 1
        batch, folds = schedule_decode(sc.tracker, sc.plan, sc.block_table, sc.slot_ids.tolist(),
                                       sc.seq_lens, sc.pages.shape[1])
        out = decode_and_fold(q, k, v, sc.pages, sc.pool, sc.plan, batch, folds, scale, **kwargs)
        dense = None
        if oracle:
            dense = torch.stack([dense_attention(q[b:b + 1], sc.keys[b], sc.values[b], scale)[0][0]
                                 for b in range(sc.batch)])
        yield out, dense


def attend_now(sc: Scenario, query: torch.Tensor, scale: float, attention=latent_decode_attention,
               need_probs: bool = False):
    """Latent-space attention of `query` ([batch, heads, head_size]) over the cache as it is
    (no token appended, no fold)."""
    batch = make_decode_batch(sc.block_table, sc.slot_ids.tolist(), sc.seq_lens, sc.exact_lens(),
                              window_size=sc.plan.exact_rows, block_size=sc.pages.shape[1])
    return attention(query, sc.pages, sc.pool.rows, batch, sc.plan.spec, scale, need_probs=need_probs)
