"""Paged storage: slot reuse, importance EMA and grouping, byte accounting."""
import math

import pytest
import torch

from attentionpack_vllm.config import AttentionPackConfig
from attentionpack_vllm.factorize import directions_in_use
from attentionpack_vllm.importance import group_of_rank, groups_by_importance, update_importance
from attentionpack_vllm.kernels.decode_inputs import make_decode_batch
from attentionpack_vllm.kernels.layout import IMAGE, TEXT, decode_flags
from attentionpack_vllm.memory import MemoryReport
from attentionpack_vllm.paged_store import page_slots, read_records
from attentionpack_vllm.kernels.latent_decode_cpu import latent_decode_attention_cpu
from attentionpack_vllm.kernels.cpu_library import unavailable_reason
from attentionpack_vllm.plan import CompressionPlan, RequestTokens
from attentionpack_vllm.prefill import store_tokens
from attentionpack_vllm.slot_pool import SlotPool
from attentionpack_vllm.windows import WindowTracker
from scenario import SIXTEEN_BIT, build_scenario, run_decode


def test_reused_slot_and_pages_carry_nothing_of_the_old_request():
    config = AttentionPackConfig.from_dict({**SIXTEEN_BIT, "rank": 16, "window_size": 5})
    fresh = build_scenario(config, num_kv_heads=2, head_size=32, prompt_lens=[30], seed=11)
    # A dirty store: another request ran (with images, decode steps, a fold) in the
    # same slot and pages before the new request starts there.
    dirty = build_scenario(config, num_kv_heads=2, head_size=32, prompt_lens=[45],
                           image_spans=[[(0, 20)]], seed=12)
    for _ in run_decode(dirty, 4, steps=7, oracle=False):
        pass
    assert dirty.window_lens() == [2]
    dirty.pages.view(-1)[:] = dirty.pages.view(-1)[torch.randperm(dirty.pages.numel())]  # stale bytes
    new = fresh.keys[0], fresh.values[0]
    slot = int(dirty.slot_ids[0])
    dirty.pool.reset(slot)
    dirty.tracker.clear([slot])
    importance = torch.zeros(30)  # the records' starting scores, as the fresh store has them
    importance[4:] = read_records(fresh.pages, page_slots(fresh.block_table[0], 0, 26, 16))[
        :, fresh.plan.layout.importance_offset]
    store_tokens(dirty.pages, dirty.pool, dirty.plan, slot, dirty.block_table[0], 0, 0, *new,
                 torch.zeros(30, dtype=torch.bool), importance)
    dirty.tracker.prefilled([slot], [30])
    dirty.keys, dirty.values, dirty.is_image, dirty.seq_lens = (
        [new[0].clone()], [new[1].clone()], [torch.zeros(30, dtype=torch.bool)], [30])
    for (a, _), (b, _) in zip(run_decode(fresh, 4, 9, oracle=False), run_decode(dirty, 4, 9, oracle=False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_window_tracker_folds_full_windows_and_restarts_them():
    tracker = WindowTracker(num_slots=4, window_size=3)
    tracker.lengths[2] = 1
    assert tracker.advance([0, 2]) == ([1, 2], [])
    assert tracker.advance([2, 0]) == ([3, 2], [0])      # slot 2's window is full: it folds
    assert (tracker.length(2), tracker.length(0)) == (0, 2)
    assert tracker.advance([0]) == ([3], [0])
    tracker.lengths[1] = 2
    tracker.clear([1])
    assert tracker.length(1) == 0


def test_window_tracker_fills_sinks_first_and_never_folds_them():
    tracker = WindowTracker(num_slots=2, window_size=2, sink_tokens=3)
    tracker.prefilled([0, 1], [1, 40])       # a one-token prompt; a long one
    assert (tracker.length(0), tracker.length(1)) == (1, 3)
    assert tracker.advance([0, 1]) == ([2, 4], [])   # slot 0: a sink row; slot 1: a window row
    assert tracker.advance([0, 1]) == ([3, 5], [1])  # slot 1's window (2 rows) folds
    assert (tracker.length(1), tracker.window_length(1)) == (3, 0)
    assert tracker.advance([0]) == ([4], [])         # slot 0's sinks are full: its window starts
    assert tracker.advance([0]) == ([5], [0])
    assert tracker.length(0) == 3


def test_importance_ema_matches_hand_computation():
    plan = CompressionPlan.build(AttentionPackConfig.from_dict({**SIXTEEN_BIT, "ema_weight": 0.25, "rank": 8}), 1, 16)
    pool = SlotPool.allocate(plan, 3, torch.float32)
    pages = torch.zeros(2, 16, plan.layout.width)
    block_table = torch.tensor([[1, 0]], dtype=torch.int32)
    slots = page_slots(block_table[0], 0, 6, 16)
    start = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    pages.view(-1, plan.layout.width)[slots, plan.layout.importance_offset] = start
    pool.window_importance[2, :2] = torch.tensor([6.0, 7.0])
    batch = make_decode_batch(block_table, [2], [6], [2], window_size=plan.exact_rows, block_size=16)
    p_c = torch.tensor([[0.1, 0.2, 0.3, 0.1]])       # 4 factor tokens
    p_w = torch.zeros(1, plan.exact_rows)
    p_w[0, :2] = torch.tensor([0.2, 0.1])            # 2 window tokens
    update_importance(pages, pool, batch, p_c, p_w, plan)
    got = pages.view(-1, plan.layout.width)[slots[:4], plan.layout.importance_offset]
    torch.testing.assert_close(got, 0.25 * start[:4] + 0.75 * 6 * torch.tensor([0.1, 0.2, 0.3, 0.1]))
    torch.testing.assert_close(pool.window_importance[2, :2],
                               0.25 * torch.tensor([6.0, 7.0]) + 0.75 * 6 * torch.tensor([0.2, 0.1]))
    assert pages.view(-1, plan.layout.width)[slots[4:], plan.layout.importance_offset].tolist() == [4.0, 5.0]


def test_groups_follow_importance_within_each_request():
    importance = torch.tensor([[0.5, 3.0, 1.0, 0.2, 9.0], [2.0, 1.0, 7.0, 0.0, 0.0]])
    groups = groups_by_importance(importance, torch.tensor([4, 3]), (0.25, 0.75))
    # Request 0: top ceil(25% of 4) = 1 token (position 1); position 4 is padding.
    assert groups[0, :4].tolist() == [1, 0, 1, 1]
    assert groups[1, :3].tolist() == [1, 1, 0]


def test_group_of_rank_follows_fractions_rounding_up():
    order = torch.arange(10)[None, :]
    groups = group_of_rank(order, torch.tensor([10]), (0.25, 0.5, 0.25))
    assert groups.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 2, 2]]  # ends at ceil(2.5)=3, ceil(7.5)=8


def test_images_and_text_get_separate_bases():
    config = AttentionPackConfig.from_dict({**SIXTEEN_BIT, "rank": 4, "sink_tokens": 0})  # every token a record
    sc = build_scenario(config, num_kv_heads=1, head_size=32, prompt_lens=[20],
                        image_spans=[[(5, 14)]], data_rank=32)
    slot = int(sc.slot_ids[0])
    flags = read_records(sc.pages, page_slots(sc.block_table[0], 0, 20, 16))[:, sc.plan.layout.flags_offset]
    modality, _ = decode_flags(flags.long())
    assert modality.tolist() == [TEXT] * 5 + [IMAGE] * 10 + [TEXT] * 5
    b_img, b_txt = sc.pool.read("basis_k", (slot, IMAGE)), sc.pool.read("basis_k", (slot, TEXT))
    assert b_img.abs().sum() > 0 and b_txt.abs().sum() > 0
    assert not torch.allclose(b_img, b_txt)


def test_energy_rank_trims_text_bases_only():
    """rank_text_energy: text bases keep the directions that reach the share; image bases keep the rank."""
    def bases(settings):
        config = AttentionPackConfig.from_dict({**SIXTEEN_BIT, "rank": 16, "sink_tokens": 0, **settings})
        sc = build_scenario(config, num_kv_heads=2, head_size=16, prompt_lens=[60],
                            image_spans=[[(10, 39)]], data_rank=32)
        slot = int(sc.slot_ids[0])
        return [int(directions_in_use(sc.pool.read("basis_k", (slot, m)))) for m in (TEXT, IMAGE)], sc.plan
    (text_full, image_full), plan = bases({})
    (text_trim, image_trim), trimmed = bases({"rank_text_energy": 0.5})
    assert plan.text_energy is None and trimmed.text_energy == 0.5
    assert text_full == image_full == image_trim == 16
    assert 0 < text_trim < 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ranks", [{"rank": 64}, {"rank_vision_key": 32, "rank_text_value": 16}])
def test_byte_accounting_matches_allocated_tensors(dtype, ranks):
    config = AttentionPackConfig.from_dict({**SIXTEEN_BIT, **ranks, "window_size": 16})
    plan = CompressionPlan.build(config, num_kv_heads=32, head_size=128)
    report = MemoryReport.of(plan, dtype)
    pool = SlotPool.allocate(plan, num_slots=3, dtype=dtype)
    item = torch.empty((), dtype=dtype).element_size()
    # Each modality's basis plane takes its own rank's rows (text 80 and image 32 key rows in
    # the unequal case); the arena adds one zero row.
    rows = sum(plan.ranks_k) + sum(plan.ranks_v) + 2 * plan.exact_rows
    assert report.slot_bytes == rows * plan.kv_width * item + plan.exact_rows * 4
    assert report.pool_spare_bytes == plan.kv_width * item
    assert pool.nbytes() == 3 * report.slot_bytes + report.pool_spare_bytes
    pages = torch.empty(5, 16, plan.layout.width, dtype=dtype)
    assert pages.numel() * pages.element_size() == 5 * 16 * report.record_bytes
    item = pages.element_size()
    assert report.dense_token_bytes == 2 * 32 * 128 * item
    dense, packed = report.request_bytes(1000, num_layers=32)
    assert dense == 1000 * 2 * 4096 * item * 32
    assert packed == (1000 * report.record_bytes + report.slot_bytes) * 32
    n = report.crossover_tokens()
    assert report.request_bytes(n)[1] < report.request_bytes(n)[0]
    assert report.request_bytes(n - 1)[1] >= report.request_bytes(n - 1)[0]


def test_request_token_bounds_shrink_the_planes_not_the_records():
    """Rank 80 with at most 16 image tokens per request: image planes take 16 rows, the records
    keep 80 columns (a page's width never depends on the bounds), the slot shrinks by exactly
    the 2 x 64 rows saved, and no image tokens at all means no image planes."""
    config = AttentionPackConfig.from_dict({"partial_rank_keys": True})
    full = CompressionPlan.build(config, num_kv_heads=3, head_size=64)
    bounded = CompressionPlan.build(config, num_kv_heads=3, head_size=64,
                                    request_tokens=RequestTokens(text=2048, image=16))
    assert full.ranks_k == full.ranks_v == (80, 80)
    assert bounded.ranks_k == bounded.ranks_v == (80, 16) and bounded.has_image
    assert bounded.layout == full.layout
    # Groups read what they would at rank 80, up to the image plane's 16 rows.
    assert full.group_cols_k == ((80, 20), (80, 20)) and bounded.group_cols_k == ((80, 20), (16, 16))
    saved = MemoryReport.of(full, torch.float32).slot_bytes - MemoryReport.of(bounded, torch.float32).slot_bytes
    assert saved == 2 * 64 * (192 + 3 * 4)  # int8 rows with one float32 scale per KV head
    pool = SlotPool.allocate(bounded, num_slots=3, dtype=torch.float32)
    report = MemoryReport.of(bounded, torch.float32)
    assert pool.nbytes() == 3 * report.slot_bytes + report.pool_spare_bytes
    assert pool.rows.basis_k.shape == (3, 2, 80) and pool.rows.arena.shape[-1] == 192
    short_text = CompressionPlan.build(config, 3, 64, request_tokens=RequestTokens(text=48, image=0))
    assert short_text.ranks_k[TEXT] == 48 and not short_text.has_image and short_text.layout == full.layout


@pytest.mark.parametrize("storage", ["auto", "int8"])
@pytest.mark.parametrize("decode", ["torch", "cpu"])
def test_planes_clamped_to_the_request_tokens_change_no_output(storage, decode):
    """The same requests (at most 12 image tokens each) through a plan whose image planes have
    rank 16 and one whose planes are clamped to 12 rows: prefill, decode steps and folds
    give the same outputs (partial rank on, so the groups' columns are covered too)."""
    if decode == "cpu" and unavailable_reason():
        pytest.skip(f"the compiled CPU kernel is unavailable: {unavailable_reason()}")
    config = AttentionPackConfig.from_dict({"storage": storage, "rank": 16, "window_size": 3, "sink_tokens": 1,
                                            "partial_rank_keys": True, "partial_rank_values": True})
    attention = latent_decode_attention_cpu if decode == "cpu" else None
    outputs = []
    for bound in (RequestTokens(), RequestTokens(text=1000, image=12)):
        sc = build_scenario(config, num_kv_heads=2, head_size=16, prompt_lens=[40, 30, 25],
                            image_spans=[[(4, 15)], [(0, 9)], [(10, 20)]], request_tokens=bound)
        outputs.append(torch.stack([out for out, _ in run_decode(sc, 4, steps=7, attention=attention,
                                                                 oracle=False)]))
    assert sc.plan.ranks_k == (16, 12)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)


def test_text_only_plan_with_larger_image_ranks_reads_planes_at_the_record_rank():
    """A text-only model configured with image ranks above its text ranks: records are as wide
    as the largest configured rank (16), so the single text plane (8 own rows) must be viewed
    at 16 rows, with spare rows behind the last slot; the PyTorch path (which failed on the
    narrower view) and the CPU kernel agree."""
    if unavailable_reason():
        pytest.skip(f"the compiled CPU kernel is unavailable: {unavailable_reason()}")
    config = AttentionPackConfig.from_dict({"rank_text_key": 8, "rank_text_value": 8, "rank_vision_key": 16,
                                            "rank_vision_value": 16, "window_size": 3})
    outputs = []
    for attention in (None, latent_decode_attention_cpu):
        sc = build_scenario(config, num_kv_heads=2, head_size=16, prompt_lens=[40, 21], has_image=False)
        outputs.append(torch.stack([out for out, _ in run_decode(sc, 4, steps=4, attention=attention, oracle=False)]))
    assert sc.plan.layout.rank_k == 16 and sc.pool.rows.basis_k.shape == (3, 1, 16)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)


def test_cache_tokens_match_what_vllm_reported():
    """512 MiB, fp16, 2 layers of LLaVA-1.5-7B's geometry (a text-only stand-in, so text
    bases only), blocks of 32, 4 slots, rank 64 in 16 bits: vLLM reported 16,384 tokens
    dense and 999,136 at rank 64 (benchmarks/results/capacity.json)."""
    config = AttentionPackConfig.from_dict({**SIXTEEN_BIT, "rank": 64})
    plan = CompressionPlan.build(config, num_kv_heads=32, head_size=128, has_image=False)
    report = MemoryReport.of(plan, torch.float16)
    assert report.cache_tokens(512 * 2**20, 2, 32, 4) == (16_384, 999_136)
    assert report.cache_tokens(report.slot_bytes * 2 * 4, 2, 32, 4)[1] == 0  # pools take it all


def test_llava_geometry_rank_64_record_is_over_60x_smaller():
    plan = CompressionPlan.build(AttentionPackConfig.from_dict({**SIXTEEN_BIT, "rank": 64}),
                                 num_kv_heads=32, head_size=128)
    report = MemoryReport.of(plan, torch.float16)
    assert plan.layout.width == 64 + 64 + 2
    assert math.isclose(report.token_ratio, 8192 / 130)
