"""Slot pools sized against the KV cache budget: the arithmetic and the setting (no vLLM)."""
import pytest
import torch

from attentionpack_vllm.config import AttentionPackConfig, AttentionPackConfigError
from attentionpack_vllm.memory import MemoryReport, size_request_slots
from attentionpack_vllm.plan import CompressionPlan


def test_slots_that_fit_the_share_are_all_kept():
    sizing = size_request_slots(requested=8, slot_bytes=100, budget_bytes=10_000, max_fraction=0.5)
    assert sizing.kept == 8 and not sizing.lowered
    assert sizing.pool_bytes == 800 and sizing.requested_pool_bytes == 800


def test_too_many_slots_are_lowered_to_the_share_of_the_budget():
    # 5,000 bytes may go to pools: 49 slots of 101 bytes (4,949), not 50 (5,050).
    sizing = size_request_slots(requested=1024, slot_bytes=101, budget_bytes=10_000, max_fraction=0.5)
    assert sizing.kept == 49 and sizing.lowered
    assert sizing.pool_bytes == 4_949 <= 5_000 < sizing.pool_bytes + 101
    assert sizing.requested_pool_bytes == 1024 * 101
    # exactly at the share: kept
    assert size_request_slots(50, 100, 10_000, 0.5).kept == 50
    assert size_request_slots(51, 100, 10_000, 0.5).kept == 50
    assert size_request_slots(1024, 100, 10_000, 0.25).kept == 25


def test_at_least_one_slot_while_one_fits_the_budget():
    sizing = size_request_slots(requested=16, slot_bytes=700, budget_bytes=1_000, max_fraction=0.5)
    assert sizing.kept == 1 and sizing.pool_bytes == 700


def test_a_slot_larger_than_the_budget_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"one AttentionPack request slot \(1000 bytes.*"
                                         r"budget \(1000 bytes\)"):
        size_request_slots(requested=4, slot_bytes=1_000, budget_bytes=1_000, max_fraction=0.5)
    with pytest.raises(ValueError, match="must all be positive"):
        size_request_slots(requested=0, slot_bytes=10, budget_bytes=1_000, max_fraction=0.5)


def test_llava_7b_default_1024_slots_on_an_h100_are_lowered():
    """The case that motivated the cap: LLaVA-1.5-7B (32 layers, 32 KV heads x 128, fp16)
    at the defaults (rank 80, int8 storage, both modalities, 4 sink tokens, a 64-token
    window) with vLLM's H100 default of 1024 requests."""
    plan = CompressionPlan.build(AttentionPackConfig(), 32, 128, has_image=True)
    slot_bytes = MemoryReport.of(plan, torch.float16).slot_bytes * 32
    # Each int8 row: 4,096 bytes + 32 float32 head scales; 32 layers.
    row = 4096 + 32 * 4
    bases, window, sinks = 2 * (80 + 80) * row * 32, 2 * 64 * row * 32, 2 * 4 * row * 32
    importance = (64 + 4) * 4 * 32                     # one float32 per window and sink row
    assert slot_bytes == bases + window + sinks + importance == 61_645_312   # 43.3 + 17.3 + 1.1 MB
    budget = int(80 * 2**30 * 0.9)   # profiled: device memory x gpu_memory_utilization
    sizing = size_request_slots(1024, slot_bytes, budget, AttentionPackConfig().max_pool_fraction)
    assert sizing.requested_pool_bytes > budget // 2   # what would have been allocated
    assert sizing.kept == budget // 2 // slot_bytes == 627 and sizing.pool_bytes <= budget // 2


def test_max_pool_fraction_setting():
    assert AttentionPackConfig().max_pool_fraction == 0.5
    assert AttentionPackConfig.from_dict({"max_pool_fraction": 0.8}).max_pool_fraction == 0.8
    for bad in (0, 0.0, 1, 1.0, 1.5, -0.1, "half", True):
        with pytest.raises(AttentionPackConfigError,
                           match=r"'max_pool_fraction' = .* is invalid: expected a number in \(0, 1\)"):
            AttentionPackConfig.from_dict({"max_pool_fraction": bad})
