"""Prefill of whole prompts and of chunks: exact attention, then compression."""
import pytest
import torch

from attentionpack_vllm.config import AttentionPackConfig
from attentionpack_vllm.decode import decode_and_fold, schedule_decode
from attentionpack_vllm.plan import CompressionPlan
from attentionpack_vllm.prefill import causal_attention, prefill_request
from attentionpack_vllm.slot_pool import SlotPool
from attentionpack_vllm.kernels.reference import dense_attention, reconstruct_request_kv
from attentionpack_vllm.windows import WindowTracker
from scenario import SIXTEEN_BIT


def dense_causal(query, keys, values, scale):
    return dense_attention(query, keys, values, scale, causal=True)[0]


@pytest.mark.parametrize("context", [7, 0])  # a later chunk; a whole prompt (SDPA's causal path)
def test_causal_attention_matches_reference(context):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, 32, generator=gen)
    k, v = torch.randn(context + 5, 64, generator=gen), torch.randn(context + 5, 64, generator=gen)
    torch.testing.assert_close(causal_attention(q, k, v, 0.2), dense_causal(q, k, v, 0.2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("chunks", [[45], [16, 16, 13], [20, 1, 24]])
def test_chunked_prefill_then_decode_at_full_rank_equals_dense(chunks, sinks):
    gen = torch.Generator().manual_seed(1)
    num_heads, num_kv_heads, head_size, block_size = 4, 2, 32, 16
    width = num_kv_heads * head_size
    config = AttentionPackConfig.from_dict({**SIXTEEN_BIT, "rank": width, "partial_rank_values": False, "window_size": 3,
                                            "sink_tokens": sinks})
    plan = CompressionPlan.build(config, num_kv_heads, head_size)
    pages = torch.full((12, block_size, plan.layout.width), float("nan"))
    pool = SlotPool.allocate(plan, 2, torch.float32)
    block_table = torch.tensor([[7, 2, 9, 4, 11, 0]], dtype=torch.int32)
    total = sum(chunks)
    q, k, v = (torch.randn(total, num_heads, head_size, generator=gen),
               torch.randn(total, width, generator=gen), torch.randn(total, width, generator=gen))
    is_image = torch.zeros(total, dtype=torch.bool)
    is_image[3:19] = True  # one image inside the first chunk
    scale = head_size ** -0.5
    tracker = WindowTracker.for_plan(2, plan)

    def decode(qd, kd, vd, seq_len):
        batch, folds = schedule_decode(tracker, plan, block_table, [1], [seq_len], block_size)
        return decode_and_fold(qd, kd, vd, pages, pool, plan, batch, folds, scale)

    start = 0
    for n in chunks:
        sl = slice(start, start + n)
        if n == 1 and start > 0:  # a one-token chunk goes down the decode path, as in the backend
            out = decode(q[sl], k[sl], v[sl], start + 1)
        else:
            out = prefill_request(q[sl], k[sl], v[sl], is_image[sl], pages, pool, plan, 1,
                                  block_table[0], start, tracker.length(1), scale)
            tracker.prefilled([1], [start + n])
        expected = dense_causal(q[sl], k[:start + n], v[:start + n], scale)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        start += n
    for step in range(7):  # decode across two folds
        qd, kd, vd = (torch.randn(1, num_heads, head_size, generator=gen),
                      torch.randn(1, width, generator=gen), torch.randn(1, width, generator=gen))
        k, v = torch.cat([k, kd]), torch.cat([v, vd])
        out = decode(qd, kd, vd, k.shape[0])
        torch.testing.assert_close(out, dense_attention(qd, k, v, scale)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunks", [[2, 30], [40], [1]])
def test_sink_tokens_stay_exact_through_prefill_decode_and_folds(chunks):
    """Rank 2 on random data loses most of every factor token; the first 4 tokens must
    still be held bit for bit, also when the prompt is shorter than the sinks (decode
    tokens fill them) and across window folds, and attention must read them exactly."""
    gen = torch.Generator().manual_seed(3)
    num_heads, num_kv_heads, head_size, block_size, sinks = 4, 2, 16, 16, 4
    width = num_kv_heads * head_size
    plan = CompressionPlan.build(AttentionPackConfig.from_dict(
        {**SIXTEEN_BIT, "rank": 2, "window_size": 3, "sink_tokens": sinks}), num_kv_heads, head_size)
    pages = torch.full((8, block_size, plan.layout.width), float("nan"))
    pool = SlotPool.allocate(plan, 2, torch.float32)
    block_table = torch.tensor([[5, 1, 7, 3, 0]], dtype=torch.int32)
    tracker = WindowTracker.for_plan(2, plan)
    total, steps = sum(chunks), 10
    q = torch.randn(total + steps, num_heads, head_size, generator=gen)
    k, v = torch.randn(total + steps, width, generator=gen), torch.randn(total + steps, width, generator=gen)
    scale = head_size ** -0.5
    start, num_folds = 0, 0
    for n in chunks:
        prefill_request(q[start:start + n], k[start:start + n], v[start:start + n],
                        torch.zeros(n, dtype=torch.bool), pages, pool, plan, 1, block_table[0], start,
                        tracker.length(1), scale)
        start += n
        tracker.prefilled([1], [start])
    for t in range(total, total + steps):
        batch, folds = schedule_decode(tracker, plan, block_table, [1], [t + 1], block_size)
        out = decode_and_fold(q[t:t + 1], k[t:t + 1], v[t:t + 1], pages, pool, plan, batch, folds, scale)
        exact = tracker.length(1) if folds is None else batch.window_lens.tolist()[0]
        held = min(t + 1, sinks)
        assert torch.equal(pool.read("window_k", (1, slice(None, held))), k[:held]) and torch.equal(pool.read("window_v", (1, slice(None, held))), v[:held])
        # Oracle: dense attention over the sinks and window as they are and the factor
        # records rebuilt, in the state the step attended to (before its fold).
        records = t + 1 - exact
        num_folds += folds is not None
        if folds is None:
            keys, values = reconstruct_request_kv(pages, block_table[0], records, pool.read("basis_k", 1),
                                                  pool.read("basis_v", 1), pool.read("window_k", 1),
                                                  pool.read("window_v", 1),
                                                  exact, plan.layout)
            torch.testing.assert_close(out, dense_attention(q[t:t + 1], keys, values, scale)[0],
                                       rtol=1e-4, atol=1e-4)
    assert num_folds >= 2

