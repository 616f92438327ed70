"""vLLM in-process (vllm.LLM) with --attention-backend attentionpack, against vLLM's own CPU backend."""
import pytest

from vllm_harness import attentionpack_engine, dense_engine, run_llm

pytestmark = pytest.mark.vllm

# Clamped to each layer's KV width; in the model's dtype, where full rank equals dense. Float64
# factorisations ("gram"): the CPU default "gram32" adds about 1e-6 of round-off per fold, which
# over dozens of folds can flip a token of these random-weight models (its bound against dense
# is tested in test_latent_decode).
FULL_RANK = {"rank": 100_000, "partial_rank_values": False, "storage": "auto", "svd": "gram"}
TEXT = ("The quick brown fox jumps over the lazy dog. A large language model reads a prompt one "
        "token at a time and keeps the keys and values of every token it has seen in a cache. ")


def text_requests(max_tokens: int = 40):
    # Mixed prompt lengths; generations long enough to cross several window folds.
    return [{"prompt": TEXT[:n], "max_tokens": max_tokens} for n in (12, 90, len(TEXT))] + \
        [{"prompt": TEXT * 4, "max_tokens": max_tokens}]


def test_full_rank_matches_dense_token_for_token_with_chunked_prefill(tiny_llama):
    engine = dict(max_num_batched_tokens=64)  # long prompts are prefilled in several chunks
    dense = run_llm(tiny_llama, dense_engine(**engine), text_requests())
    packed = run_llm(tiny_llama, attentionpack_engine({**FULL_RANK, "window_size": 8}, **engine),
                     text_requests())
    assert "Using AttentionPack attention backend" in packed.log
    assert "decode with the compiled CPU kernel" in packed.log  # the default on CPU
    # Full rank saves nothing, and the log says so rather than rounding to "1.0x smaller".
    assert "x larger); record = K' 64 + V' 64" in packed.log
    assert "stores at least as many bytes per token as the dense cache" in packed.log
    assert packed.token_ids == dense.token_ids


def test_full_rank_matches_dense_with_spawned_workers(tiny_llama):
    requests = text_requests(24)[:2]
    env = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    dense = run_llm(tiny_llama, dense_engine(), requests, env=env)
    packed = run_llm(tiny_llama, attentionpack_engine({**FULL_RANK, "window_size": 5}), requests, env=env)
    assert packed.token_ids == dense.token_ids


def test_forced_triton_kernel_runs_inside_vllm_and_matches_dense(tiny_llama):
    """The exact GPU decode path (the fused Triton kernel), run by vLLM on CPU under
    Triton's interpreter; partial rank on, so the kernel's probabilities drive the groups."""
    requests = text_requests(12)[:2]
    env = {"TRITON_INTERPRET": "1"}
    settings = {"window_size": 5, "rank": 100_000, "storage": "auto", "svd": "gram"}
    torch_path = run_llm(tiny_llama, attentionpack_engine({**settings, "decode_kernel": "torch"}), requests)
    kernel = run_llm(tiny_llama, attentionpack_engine({**settings, "decode_kernel": "triton"}), requests,
                     env=env)
    assert "decode with the Triton kernel" in kernel.log
    assert kernel.token_ids == torch_path.token_ids
    full = run_llm(tiny_llama, attentionpack_engine({**FULL_RANK, "decode_kernel": "triton"}), requests,
                   env=env)
    dense = run_llm(tiny_llama, dense_engine(), requests)
    assert full.token_ids == dense.token_ids


LLAVA_PROMPT = "USER: {images}\nDescribe the picture. ASSISTANT:"


def llava_requests(max_tokens: int = 32):
    return [
        {"prompt": LLAVA_PROMPT.format(images="<image>"), "images": [1], "max_tokens": max_tokens},
        {"prompt": LLAVA_PROMPT.format(images="<image><image>"), "images": [2, 3], "max_tokens": max_tokens},
        {"prompt": "USER: How many animals are there? ASSISTANT:", "max_tokens": max_tokens},
        {"prompt": LLAVA_PROMPT.format(images="<image>") + " " + TEXT, "images": [4], "max_tokens": max_tokens},
    ]


def test_llava_with_images_full_rank_matches_dense(tiny_llava):
    """Also with at most 2 images per prompt (16 tokens each): the image planes then take 32
    of the 64 rows full rank has, and the outputs stay dense's token for token."""
    dense = run_llm(tiny_llava, dense_engine(), llava_requests())
    packed = run_llm(tiny_llava, attentionpack_engine({**FULL_RANK, "window_size": 6}), llava_requests())
    assert "image tokens found in a prompt" in packed.log
    assert "image bases take" not in packed.log  # 999 images allowed: no bound below the rank
    assert packed.token_ids == dense.token_ids
    limited = run_llm(tiny_llava, attentionpack_engine({**FULL_RANK, "window_size": 6},
                                                       limit_mm_per_prompt={"image": 2}), llava_requests())
    assert "image bases take 32 key and 32 value rows per layer: a request holds at most 32 image tokens" \
        in limited.log
    assert limited.token_ids == dense.token_ids
    # The workers' smaller slot pools leave the records more of the same budget.
    capacity = r"KV cache size: ([\d,]+) tokens"
    assert limited.log_int(capacity) > packed.log_int(capacity)


def test_llava_image_tokens_use_the_vision_ranks(tiny_llava):
    """Vision ranks cut to 1 change the image prompts' outputs and leave the text-only
    prompt's alone: image spans reach the backend and select the vision bases."""
    requests = llava_requests(16)[:3]
    full = run_llm(tiny_llava, attentionpack_engine(FULL_RANK), requests)
    starved = run_llm(tiny_llava, attentionpack_engine(
        {**FULL_RANK, "rank_vision_key": 1, "rank_vision_value": 1}), requests)
    assert starved.token_ids[0] != full.token_ids[0] and starved.token_ids[1] != full.token_ids[1]
    assert starved.token_ids[2] == full.token_ids[2]


def test_preemption_and_slot_reuse_keep_full_rank_outputs_equal_to_dense(tiny_llama):
    # A cache too small for all requests at once: requests wait, get preempted and
    # restart, and slots are reused by later requests.
    requests = [{"prompt": TEXT[: 60 + 17 * i] * 2, "max_tokens": 120} for i in range(12)]
    engine = dict(kv_cache_memory_bytes=2 * 1024 * 1024, max_num_seqs=6, block_size=32,
                  max_model_len=512, disable_log_stats=False)
    dense = run_llm(tiny_llama, dense_engine(**engine), requests)
    # Text-only slots hold no image bases: a smaller budget keeps the cache short.
    engine["kv_cache_memory_bytes"] = 1024 * 1024
    packed = run_llm(tiny_llama, attentionpack_engine({**FULL_RANK, "window_size": 8}, **engine), requests)
    assert packed.preemptions > 0, "the cache was meant to be too small: no request was preempted"
    assert packed.token_ids == dense.token_ids


def test_int8_storage_runs_inside_vllm_on_both_decode_paths(tiny_llama):
    """int8 records, bases and windows through vLLM's page allocation (rows of bytes in the
    model's cache tensor), chunked prefill and window folds, on the PyTorch path, the
    compiled CPU kernel and the Triton kernel (under the interpreter). Tokens are not compared: the two paths differ
    by float32 summation order (about 5e-6 here), which flips the int8 rounding of later
    keys and values, and this random-weight model turns that into another continuation.
    The kernel equals the PyTorch path on the same int8 state in test_triton_kernel;
    closeness to dense is measured on SmolLM2 in test_quality_harness."""
    engine = dict(max_num_batched_tokens=64)
    settings = {**FULL_RANK, "window_size": 8, "storage": "int8"}
    torch_path = run_llm(tiny_llama, attentionpack_engine({**settings, "decode_kernel": "torch"}, **engine),
                         text_requests(24))
    # float32 model: 64 + 64 int8 factors, two float32 scales, float32 importance, a flags byte, padding.
    assert "AttentionPack bytes per token per layer: 144 (dense 512" in torch_path.log
    assert "(int8 factors with float32 scales)" in torch_path.log
    assert [len(t) for t in torch_path.token_ids] == [24] * 4
    compiled = run_llm(tiny_llama, attentionpack_engine({**settings, "decode_kernel": "cpu"}, **engine),
                       text_requests(24))
    assert "decode with the compiled CPU kernel" in compiled.log
    assert [len(t) for t in compiled.token_ids] == [24] * 4
    kernel = run_llm(tiny_llama, attentionpack_engine({**settings, "decode_kernel": "triton"}, **engine),
                     text_requests(24), env={"TRITON_INTERPRET": "1"})
    assert "decode with the Triton kernel" in kernel.log
    assert [len(t) for t in kernel.token_ids] == [24] * 4
