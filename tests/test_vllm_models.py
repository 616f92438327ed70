"""vLLM with AttentionPack on the capacity-geometry model and the real SmolLM2."""
import pytest

from vllm_harness import attentionpack_engine, dense_engine, run_llm

pytestmark = pytest.mark.vllm

KV_BYTES = 256 * 1024 * 1024
CAPACITY_LINE = r"KV cache size: ([\d,]+) tokens"


def test_capacity_at_llava_7b_geometry_rank_64(llava_geometry_model):
    """32 heads x 128 (LLaVA-1.5-7B's attention), ranks 64 in 16 bits: >= 20x the dense
    cache tokens in the same bytes, per-request slot pools included; the logs agree with
    the accounting."""
    from attentionpack_vllm.config import AttentionPackConfig
    from attentionpack_vllm.memory import MemoryReport
    from attentionpack_vllm.plan import CompressionPlan

    engine = dict(kv_cache_memory_bytes=KV_BYTES, max_num_seqs=4, max_model_len=1024, block_size=32)
    request = [{"prompt": "The capital of France is", "max_tokens": 4}]
    dense = run_llm(llava_geometry_model, dense_engine(**engine), request)
    settings = {"rank": 64, "storage": "auto"}
    packed = run_llm(llava_geometry_model, attentionpack_engine(settings, **engine), request)
    dense_tokens, packed_tokens = dense.log_int(CAPACITY_LINE), packed.log_int(CAPACITY_LINE)
    assert packed_tokens >= 20 * dense_tokens, (packed_tokens, dense_tokens)

    # The geometry model is a text-only Llama: its slots hold no image bases.
    plan = CompressionPlan.build(AttentionPackConfig.from_dict(settings), 32, 128, has_image=False)
    report = MemoryReport.of(plan, __import__("torch").float32)
    layers, block = 2, 32
    pools = (report.slot_bytes * 4 + report.pool_spare_bytes) * layers   # 4 slots' rows, the zero row
    assert packed.log_int(r"AttentionPack slot pools take (\d+) bytes") == pools
    expected_blocks = (KV_BYTES - pools) // (report.record_bytes * layers * block)
    assert abs(packed_tokens - expected_blocks * block) <= block, (packed_tokens, expected_blocks * block)
    assert dense_tokens == KV_BYTES // (report.dense_token_bytes * layers * block) * block
    assert packed.log_int(r"the dense cache would hold (\d+) tokens") == pytest.approx(dense_tokens, rel=0.01)
    assert "(dense 32768: 63.02x smaller)" in packed.log  # fp32: 8192 / 130 elements
    assert "stores at least as many bytes" not in packed.log


SMOLLM2_QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
    "What is 12 plus 7?",
    "Who wrote Romeo and Juliet?",
    "Give me a tip for sleeping well.",
    "What is the largest planet in the solar system?",
    "Translate 'thank you' into Spanish.",
]


def test_smollm2_default_settings_stay_close_to_dense(smollm2):
    """Default settings (ranks 80 of a 192-wide KV, int8 storage, partial rank off, 4 sink
    tokens, 64-token window) on the real SmolLM2-135M-Instruct.

    Measure: greedy tokens agreeing with dense before the first divergence, over the
    first 32 generated tokens, averaged over eight chat prompts; and the capital of France
    still answered. Threshold: 0.5. Greedy decoding amplifies the first small difference
    into a different continuation, so agreement-until-divergence is a strict measure; half
    of the tokens matching with the key fact kept separates "close" from a broken cache
    (which diverges within a token or two) while leaving room for truncation and rounding.
    """
    requests = [{"chat": [{"role": "user", "content": q}], "max_tokens": 32, "ignore_eos": True}
                for q in SMOLLM2_QUESTIONS]
    engine = dict(max_model_len=2048, kv_cache_memory_bytes=256 * 1024 * 1024)
    dense = run_llm(smollm2, dense_engine(**engine), requests)
    packed = run_llm(smollm2, attentionpack_engine({}, **engine), requests)
    assert "Paris" in dense.texts[0] and "Paris" in packed.texts[0], packed.texts[0]

    def agreement(a, b):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        return same / len(a)

    scores = [agreement(d, p) for d, p in zip(dense.token_ids, packed.token_ids)]
    print("greedy agreement until divergence:", scores)
    assert sum(scores) / len(scores) >= 0.5, (scores, packed.texts)
