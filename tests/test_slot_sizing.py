"""The row pool sized against the KV cache budget: the arithmetic and the setting (no vLLM)."""
import pytest
import torch

from attentionpack_vllm.config import AttentionPackConfig, AttentionPackConfigError
from attentionpack_vllm.memory import MemoryReport, size_row_pool
from attentionpack_vllm.plan import CompressionPlan
from attentionpack_vllm.row_pool import full_request_rows


def test_rows_for_every_slot_when_they_fit_the_share():
    sizing = size_row_pool(slots=8, full_rows=10, row_bytes=10, slot_bytes=5, budget_bytes=10_000, max_fraction=0.5)
    assert sizing.rows == 80 and not sizing.capped and sizing.full_requests == 8
    assert sizing.pool_bytes == 81 * 10 + 8 * 5 == sizing.uncapped_pool_bytes


def test_rows_are_capped_at_the_share_of_the_budget():
    # 5,000 bytes may go to pools: 1024 slots' window scores (1,024), the zero row (11), and
    # 360 rows of 11 bytes (3,960), not 361 (3,971 + 1,035 > 5,000).
    sizing = size_row_pool(slots=1024, full_rows=10, row_bytes=11, slot_bytes=1, budget_bytes=10_000,
                           max_fraction=0.5)
    assert sizing.capped and sizing.rows == 360 and sizing.full_requests == 36
    assert sizing.pool_bytes == 361 * 11 + 1024 <= 5_000 < sizing.pool_bytes + 11
    assert sizing.uncapped_pool_bytes == 10_241 * 11 + 1024


def test_at_least_one_full_request_while_it_fits_the_budget():
    sizing = size_row_pool(slots=16, full_rows=60, row_bytes=10, slot_bytes=0, budget_bytes=1_000, max_fraction=0.5)
    assert sizing.rows == 60 and sizing.pool_bytes == 610


def test_a_request_larger_than_the_budget_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"one AttentionPack request's bases and window at full rank \(99 rows of "
                                         r"10 bytes.*budget \(1000 bytes\)"):
        size_row_pool(slots=4, full_rows=99, row_bytes=10, slot_bytes=0, budget_bytes=1_000, max_fraction=0.5)
    with pytest.raises(ValueError, match="must all be positive"):
        size_row_pool(slots=0, full_rows=10, row_bytes=10, slot_bytes=0, budget_bytes=1_000, max_fraction=0.5)


def test_llava_7b_default_1024_requests_on_an_h100_are_capped():
    """The case that motivated the cap: LLaVA-1.5-7B (32 layers, 32 KV heads x 128, fp16)
    at the defaults (rank 80, int8 storage, both modalities, 4 sink tokens, a 64-token
    window) with vLLM's H100 default of 1024 requests."""
    plan = CompressionPlan.build(AttentionPackConfig(), 32, 128, has_image=True)
    report = MemoryReport.of(plan, torch.float16)
    slot_bytes = report.slot_bytes * 32
    # Each int8 row: 4,096 bytes + 32 float32 head scales; 32 layers.
    row = 4096 + 32 * 4
    bases, window, sinks = 2 * (80 + 80) * row * 32, 2 * 64 * row * 32, 2 * 4 * row * 32
    importance = (64 + 4) * 4 * 32                     # one float32 per window and sink row
    assert slot_bytes == bases + window + sinks + importance == 61_645_312   # 43.3 + 17.3 + 1.1 MB
    assert report.row_bytes == row and full_request_rows(plan) == 2 * 80 + 2 * 80 + 2 * 68
    budget = int(80 * 2**30 * 0.9)   # profiled: device memory x gpu_memory_utilization
    sizing = size_row_pool(1024, full_request_rows(plan), row * 32, importance, budget,
                           AttentionPackConfig().max_pool_fraction)
    assert sizing.uncapped_pool_bytes > budget // 2   # what rows for every slot would take
    assert sizing.capped and sizing.pool_bytes <= budget // 2 < sizing.pool_bytes + row * 32
    assert sizing.full_requests == 626    # at full rank (the 1024 slots keep window scores); more when smaller


def test_max_pool_fraction_setting():
    assert AttentionPackConfig().max_pool_fraction == 0.5
    assert AttentionPackConfig.from_dict({"max_pool_fraction": 0.8}).max_pool_fraction == 0.8
    for bad in (0, 0.0, 1, 1.0, 1.5, -0.1, "half", True):
        with pytest.raises(AttentionPackConfigError,
                           match=r"'max_pool_fraction' = .* is invalid: expected a number in \(0, 1\)"):
            AttentionPackConfig.from_dict({"max_pool_fraction": bad})
