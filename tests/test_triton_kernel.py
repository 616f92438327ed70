"""The fused Triton decode kernel against the PyTorch latent-space path (interpreter on CPU)."""
import pytest
import torch

from attentionpack_vllm.config import AttentionPackConfig
from attentionpack_vllm.kernels.latent_decode_torch import latent_decode_attention
from attentionpack_vllm.kernels.latent_decode_triton import latent_decode_attention_triton
from scenario import build_scenario, run_decode

pytestmark = pytest.mark.triton


def both(sc, num_heads, window_lens=None, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sc.batch, num_heads, sc.plan.head_size, generator=gen).to(sc.pages.dtype)
    w_lens = sc.pool.window_lens[sc.slot_ids.long()] if window_lens is None else window_lens
    c_lens = torch.tensor(sc.seq_lens) - w_lens.long()
    cols_k, cols_v = sc.plan.group_cols_tensors()
    args = (q, sc.pages, sc.block_table, c_lens, sc.slot_ids, sc.pool.basis_k, sc.pool.basis_v,
            sc.pool.window_k, sc.pool.window_v, w_lens, cols_k, cols_v, sc.plan.layout,
            sc.plan.head_size ** -0.5)
    return latent_decode_attention(*args), latent_decode_attention_triton(*args, **kwargs)


def assert_same(ref, got, tol=1e-4):
    for a, b in zip(ref, got):
        torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol)


# (num_heads, num_kv_heads, head_size, rank, block_size)
GRID = [
    (4, 4, 16, 16, 16),    # MHA
    (8, 2, 32, 24, 16),    # GQA, rank not a power of two
    (6, 3, 64, 32, 32),    # GQA, odd head count
    (4, 1, 64, 64, 64),    # MQA, bigger pages
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_size,rank,block_size", GRID)
@pytest.mark.parametrize("partial", [False, True])
def test_kernel_matches_torch_reference(num_heads, num_kv_heads, head_size, rank, block_size, partial):
    config = AttentionPackConfig.from_dict({
        "rank": rank, "window_size": 4, "partial_rank_values": partial, "partial_rank_keys": partial,
        "group_fractions": [0.5, 0.5], "rank_text_value": max(16, rank // 2)})
    # Ragged lengths: 1, mid-block, exactly one block, several blocks; images in some.
    sc = build_scenario(config, num_kv_heads=num_kv_heads, head_size=head_size,
                        prompt_lens=[1, 7, block_size, 2 * block_size + 5],
                        image_spans=[[], [(1, 4)], [], [(3, block_size + 2)]],
                        block_size=block_size, pages_fill=float("nan"))
    for _ in run_decode(sc, num_heads, steps=2, oracle=False):  # windows in use, groups assigned
        pass
    ref, got = both(sc, num_heads)
    assert_same(ref, got)


def test_empty_and_full_windows_and_split_pages():
    config = AttentionPackConfig.from_dict({"rank": 16, "window_size": 3})
    sc = build_scenario(config, num_kv_heads=2, head_size=32, prompt_lens=[40, 70, 3],
                        image_spans=[[(0, 20)], [], [(0, 2)]])
    for _ in run_decode(sc, 4, steps=2, oracle=False):
        pass
    for window_lens in (torch.zeros(3, dtype=torch.int32), torch.full((3,), 3, dtype=torch.int32)):
        ref, got = both(sc, 4, window_lens=window_lens, pages_per_split=1)  # one page per program
        assert_same(ref, got)


def test_kernel_without_probabilities_returns_only_the_output():
    config = AttentionPackConfig.from_dict({"rank": 16})
    sc = build_scenario(config, num_kv_heads=2, head_size=32, prompt_lens=[20])
    ref, got = both(sc, 4, need_probs=False)
    assert got[1] is None and got[2] is None
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage(dtype):
    config = AttentionPackConfig.from_dict({"rank": 32, "window_size": 4})
    sc = build_scenario(config, num_kv_heads=2, head_size=32, prompt_lens=[33, 9],
                        image_spans=[[(2, 12)], []], dtype=dtype)
    ref, got = both(sc, 4)
    assert got[0].dtype == dtype
    assert_same(ref, got, tol=2e-2)


def test_decode_steps_with_the_kernel_match_the_torch_path():
    config = AttentionPackConfig.from_dict({"rank": 16, "window_size": 3})
    kwargs = dict(num_kv_heads=2, head_size=32, prompt_lens=[30, 17], image_spans=[[(4, 20)], []])
    a, b = build_scenario(config, **kwargs), build_scenario(config, **kwargs)
    steps = zip(run_decode(a, 4, 5, oracle=False),
                run_decode(b, 4, 5, oracle=False, attention=latent_decode_attention_triton))
    for (out_a, _), (out_b, _) in steps:  # crosses a fold; importance drives the groups
        torch.testing.assert_close(out_b, out_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.pages, b.pages, rtol=1e-4, atol=1e-4)
