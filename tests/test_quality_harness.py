"""The quality benchmark's transformers harness (benchmarks/hf_attentionpack.py).

Its perplexity and next-token agreement are only worth something if the dense row is
the model's own attention, the full-rank row goes through the AttentionPack core and
equals dense, and a low-rank row really changes the logits.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import hf_attentionpack as hfap  # noqa: E402
from scenario import SIXTEEN_BIT  # noqa: E402

from attentionpack_vllm.config import AttentionPackConfig  # noqa: E402

NUM_LAYERS, NUM_KV_HEADS, HEAD_SIZE = 2, 2, 32  # build_tiny_llama
PREFIX, TOKENS = 40, 120  # 80 decode steps: two window folds of 32


@pytest.fixture(scope="module")
def scored(tiny_llama):
    model = hfap.load_causal_lm(tiny_llama)
    ids = torch.randint(3, model.config.vocab_size, (TOKENS,),
                        generator=torch.Generator().manual_seed(0)).tolist()

    def packed(seed, **settings):
        return hfap.PackedCache(AttentionPackConfig.from_dict({**SIXTEEN_BIT, **settings}), NUM_LAYERS, NUM_KV_HEADS,
                                HEAD_SIZE, TOKENS, seed=seed)

    caches = [hfap.DenseCache(NUM_LAYERS),
              packed(1, rank=NUM_KV_HEADS * HEAD_SIZE, partial_rank_values=False),
              packed(2, rank=4, partial_rank_values=False)]
    nll, top1 = hfap.teacher_forced(model, ids, PREFIX, caches)
    return model, ids, nll, top1


def test_shapes(scored):
    _, _, nll, top1 = scored
    assert nll.shape == top1.shape == (3, TOKENS - PREFIX)
    assert nll.dtype == torch.float64 and top1.dtype == torch.int64


def test_dense_row_is_the_models_own_attention(scored):
    model, ids, nll, _ = scored
    native = hfap.native_nll(model, ids, PREFIX)
    torch.testing.assert_close(nll[0], native, rtol=0, atol=1e-4)


def test_full_rank_through_the_cache_equals_dense(scored):
    _, _, nll, top1 = scored
    torch.testing.assert_close(nll[1], nll[0], rtol=0, atol=1e-4)
    assert torch.equal(top1[1], top1[0])


def test_low_rank_changes_the_predictions(scored):
    _, _, nll, top1 = scored
    assert (nll[2] - nll[0]).abs().max() > 1e-2
    assert (top1[2] != top1[0]).any()


def test_chunked_prefill_agrees_with_the_whole_prompt_on_smollm2(smollm2):
    """A 512-token prompt prefilled whole or in chunks of 128 (each later chunk attends to
    the compressed earlier ones), then 64 tokens scored: perplexity within 3 % at the
    defaults and at rank 64 in 16 bits, where compression itself costs more than 3 %
    here, so the tolerance is finer than the loss (benchmarks/quality.py measured chunks
    of 256 and 512 within 1.5 % at 1,024 prompt tokens; see its chunked rows)."""
    import pydoc_data.topics as topics
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2)(topics.topics["execmodel"]).input_ids[:576]
    model = hfap.load_causal_lm(smollm2)

    settings = [{}, {**SIXTEEN_BIT, "rank": 64}]

    def scored(chunk):
        caches = [hfap.PackedCache(AttentionPackConfig.from_dict(s), 30, 3, 64, len(ids), seed=i)
                  for i, s in enumerate(settings)]
        nll, _ = hfap.teacher_forced(model, ids, 512, caches, prefill_chunk=chunk)
        return torch.exp(nll.mean(-1))

    whole, chunked = scored(None), scored(128)
    dense, _ = hfap.teacher_forced(model, ids, 512, [hfap.DenseCache(30)])
    assert ((chunked / whole - 1).abs() < 0.03).all(), (chunked, whole)
    assert float(whole[1] / torch.exp(dense[0].mean())) > 1.03  # the tolerance is finer than the loss


def test_int8_storage_costs_under_two_percent_perplexity_on_smollm2(smollm2):
    """Default settings with int8 records, bases and exact rows against the same in the
    model's dtype: a 512-token prompt, 64 tokens scored, perplexity within 2 % (the
    memory issue's target; benchmarks/quality.py measures it at 1,024 prompt tokens)."""
    import pydoc_data.topics as topics
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2)(topics.topics["execmodel"]).input_ids[:576]
    model = hfap.load_causal_lm(smollm2)
    caches = [hfap.PackedCache(AttentionPackConfig.from_dict({"storage": storage}), 30, 3, 64, len(ids), seed=i)
              for i, storage in enumerate(("auto", "int8"))]
    nll, _ = hfap.teacher_forced(model, ids, 512, caches)
    ppl = torch.exp(nll.mean(dim=1))
    assert abs(float(ppl[1] / ppl[0]) - 1) < 0.02, ppl
    assert (nll[1] - nll[0]).abs().max() > 0   # the rounding does reach the logits
