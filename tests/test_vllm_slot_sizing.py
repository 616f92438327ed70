"""vLLM with the row pool sized against the KV cache budget, and requests admitted by their rows."""
import pytest
import torch

from attentionpack_vllm.config import AttentionPackConfig
from attentionpack_vllm.memory import MemoryReport, size_row_pool
from attentionpack_vllm.plan import CompressionPlan
from attentionpack_vllm.row_pool import full_request_rows
from vllm_harness import attentionpack_engine, dense_engine, run_llm

pytestmark = pytest.mark.vllm

MiB = 1 << 20
# The tiny Llama: 2 layers, 2 KV heads x 32 (width 64), text only, float32, default
# settings (ranks clamped to 64, int8 storage).
TINY_PLAN = CompressionPlan.build(AttentionPackConfig(), 2, 32, has_image=False)
TINY_REPORT = MemoryReport.of(TINY_PLAN, torch.float32)
TINY_SLOT_BYTES = TINY_REPORT.slot_bytes * 2


def expected_rows(budget: int, fraction: float = 0.5, slots: int = 1024) -> int:
    return size_row_pool(slots, full_request_rows(TINY_PLAN), TINY_REPORT.row_bytes * 2,
                         TINY_REPORT.slot_fixed_bytes * 2, budget, fraction).rows


@pytest.fixture(scope="module")
def registered():
    from attentionpack_vllm import plugin
    plugin.register()
    return plugin


def engine_config(model, settings=None, backend="attentionpack", **engine):
    from vllm.engine.arg_utils import EngineArgs
    args = EngineArgs(model=str(model), attention_backend=backend, dtype="float32",
                      max_model_len=512, enforce_eager=True,
                      additional_config={"attentionpack": settings or {}}, **engine)
    return args.create_engine_config()


def shipped_rows(config) -> int | None:
    rows = (config.additional_config or {}).get("attentionpack_row_pool")
    return None if rows is None else rows - 1   # without the zero row


def test_engine_config_row_pool_follows_the_budget(registered, tiny_llama, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    # Per layer a row is 64 int8 bytes plus 2 float32 head scales; a request at full rank
    # holds 2 x 64 basis rows and 2 x (64 + 4) exact rows, and every slot 68 float32 scores.
    assert TINY_REPORT.row_bytes == 64 + 2 * 4 and full_request_rows(TINY_PLAN) == 2 * 64 + 2 * 68 == 264
    assert TINY_SLOT_BYTES == 2 * (264 * 72 + 68 * 4) == 38_560
    # Rows for 1024 requests would take 37.7 MiB: a 16 MiB budget keeps what fits in half of it
    # (8 MiB less 1024 slots' scores: 54,384 rows of 144 bytes, 206 requests at full rank),
    # and max_num_seqs stays 1024.
    config = engine_config(tiny_llama, max_num_seqs=1024, kv_cache_memory_bytes=16 * MiB)
    assert config.scheduler_config.max_num_seqs == 1024
    assert shipped_rows(config) == expected_rows(16 * MiB) == (8 * MiB - 1024 * 544) // 144 - 1 == 54_384
    config = engine_config(tiny_llama, {"max_pool_fraction": 0.25}, max_num_seqs=1024, kv_cache_memory_bytes=16 * MiB)
    assert shipped_rows(config) == expected_rows(16 * MiB, 0.25)
    # A budget with room keeps rows for every slot; the dense backend is never touched.
    config = engine_config(tiny_llama, max_num_seqs=1024, kv_cache_memory_bytes=1024 * MiB)
    assert shipped_rows(config) == 1024 * 264
    config = engine_config(tiny_llama, backend=None, max_num_seqs=1024, kv_cache_memory_bytes=16 * MiB)
    assert shipped_rows(config) is None and config.scheduler_config.max_num_seqs == 1024
    # VLLM_CPU_KVCACHE_SPACE (GiB) wins over the flag, as in vLLM's CPU platform.
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    config = engine_config(tiny_llama, max_num_seqs=1024, kv_cache_memory_bytes=16 * MiB)
    assert shipped_rows(config) == 1024 * 264


def test_profiled_budget_is_device_memory_times_utilization(registered, tiny_llama, monkeypatch):
    from vllm.platforms import current_platform
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(type(current_platform), "get_device_total_memory",
                        classmethod(lambda cls, device_id=0: 40 * MiB))
    config = engine_config(tiny_llama, max_num_seqs=1024, gpu_memory_utilization=0.5)
    assert shipped_rows(config) == expected_rows(20 * MiB)


def test_1024_seqs_on_a_small_budget_start_with_a_warning_and_serve(tiny_llama):
    """Rows for 1024 requests at full rank (37.7 MiB) do not fit 16 MiB: the pool is capped
    at half the budget with a warning, max_num_seqs stays, and the engine serves."""
    requests = [{"prompt": f"Request number {i} says hello to the engine", "max_tokens": 12}
                for i in range(6)]
    requests.append(dict(requests[0]))  # the same prompt again: greedy gives the same tokens
    run = run_llm(tiny_llama, attentionpack_engine(
        max_num_seqs=1024, kv_cache_memory_bytes=16 * MiB, max_model_len=512), requests)
    rows = expected_rows(16 * MiB)
    assert (f"rows for all 1024 requests (max_num_seqs) at full rank would take "
            f"{(1024 * 264 + 1) * 144 + 1024 * 544} bytes, more than max_pool_fraction 0.5 of the "
            f"{16 * MiB}-byte KV cache budget (--kv-cache-memory-bytes); the row pool keeps {rows} rows") in run.log
    assert run.log_int(r"AttentionPack row pool: (\d+) rows") == rows
    # the workers allocated the arena and the window scores, and the capacity line reports them
    pools = (rows + 1) * 144 + 1024 * 544
    assert run.log_int(r"AttentionPack slot pools take (\d+) bytes") == pools
    assert run.log_int(r"bytes of slot pools for (\d+) requests") == 1024
    assert run.log_int(r"records plus (\d+) bytes of slot pools") == pools
    assert "do not fit the KV cache budget" not in run.log and "Traceback" not in run.log
    assert [len(t) for t in run.token_ids] == [12] * len(requests)
    assert run.token_ids[-1] == run.token_ids[0]


def test_requests_wait_for_rows_and_still_match_dense(tiny_llama):
    """A row pool with room for two requests at full rank, twelve long requests, and pages
    for all of them: the scheduler runs a request's step only while its rows fit (the
    others wait, or are preempted and restart), and the tokens equal dense's."""
    settings = {"rank": 100_000, "partial_rank_values": False, "storage": "auto", "svd": "gram",
                "window_size": 8}
    text = ("The quick brown fox jumps over the lazy dog. A large language model reads a prompt one "
            "token at a time and keeps the keys and values of every token it has seen in a cache. ")
    requests = [{"prompt": text[: 60 + 17 * i] * 2, "max_tokens": 60} for i in range(12)]
    engine = dict(kv_cache_memory_bytes=8 * MiB, max_num_seqs=6, block_size=32, max_model_len=512)
    dense = run_llm(tiny_llama, dense_engine(**engine), requests)
    # float32 rows: 64 x 4 bytes, 2 layers; full rank 2 x 64 basis + 2 x (4 + 8) exact rows.
    full, row_bytes, scores = 2 * 64 + 2 * 12, 2 * 256, 2 * 12 * 4
    fraction = ((2 * full + 1) * row_bytes + 6 * scores + 1) / (8 * MiB)
    packed = run_llm(tiny_llama, attentionpack_engine({**settings, "max_pool_fraction": fraction}, **engine),
                     requests)
    assert packed.log_int(r"AttentionPack row pool: (\d+) rows") == 2 * full
    assert "AttentionPack: the row pool is full" in packed.log
    assert "Traceback" not in packed.log
    assert packed.token_ids == dense.token_ids

