"""vLLM with AttentionPack on the capacity-geometry model and the real SmolLM2."""
import pytest

from vllm_harness import attentionpack_engine, dense_engine, run_llm

pytestmark = pytest.mark.vllm

KV_BYTES = 256 * 1024 * 1024
CAPACITY_LINE = r"KV cache size: ([\d,]+) tokens"


def test_capacity_at_llava_7b_geometry_rank_64(llava_geometry_model):
    """32 heads x 128 (LLaVA-1.5-7B's attention), ranks 64: >= 20x the dense cache tokens in
    the same bytes, per-request slot pools included; the logs agree with the accounting."""
    from attentionpack_vllm.config import AttentionPackConfig
    from attentionpack_vllm.memory import MemoryReport
    from attentionpack_vllm.plan import CompressionPlan

    engine = dict(kv_cache_memory_bytes=KV_BYTES, max_num_seqs=4, max_model_len=1024, block_size=32)
    request = [{"prompt": "The capital of France is", "max_tokens": 4}]
    dense = run_llm(llava_geometry_model, dense_engine(**engine), request)
    packed = run_llm(llava_geometry_model, attentionpack_engine({}, **engine), request)
    dense_tokens, packed_tokens = dense.log_int(CAPACITY_LINE), packed.log_int(CAPACITY_LINE)
    assert packed_tokens >= 20 * dense_tokens, (packed_tokens, dense_tokens)

    report = MemoryReport.of(CompressionPlan.build(AttentionPackConfig(), 32, 128), __import__("torch").float32)
    layers, block = 2, 32
    pools = report.slot_bytes * layers * 4
    assert packed.log_int(r"AttentionPack slot pools take (\d+) bytes") == pools
    expected_blocks = (KV_BYTES - pools) // (report.record_bytes * layers * block)
    assert abs(packed_tokens - expected_blocks * block) <= block, (packed_tokens, expected_blocks * block)
    assert dense_tokens == KV_BYTES // (report.dense_token_bytes * layers * block) * block
    assert packed.log_int(r"the dense cache would hold (\d+) tokens") == pytest.approx(dense_tokens, rel=0.01)
