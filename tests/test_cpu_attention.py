"""vLLM's CPU attention kernel as the exact prefill attention, against the PyTorch reference."""
import pytest
import torch

from attentionpack_vllm import cpu_attention
from attentionpack_vllm.prefill import causal_attention

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="this vLLM build has no CPU attention kernel")


@pytest.mark.parametrize("num_heads,num_kv_heads,head_size", [(9, 3, 64), (4, 4, 32), (8, 1, 64)])
@pytest.mark.parametrize("context,n", [(0, 37), (0, 200), (21, 16), (150, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_causal_attention(num_heads, num_kv_heads, head_size, context, n, dtype):
    """Whole prompts and later chunks (queries at the end of a longer context), not multiples
    of the scratch page size; both compute in float32."""
    gen = torch.Generator().manual_seed(context + n)
    query = torch.randn(n, num_heads, head_size, generator=gen).to(dtype)
    keys = torch.randn(context + n, num_kv_heads * head_size, generator=gen)
    values = torch.randn(context + n, num_kv_heads * head_size, generator=gen)
    got = cpu_attention.causal_attention_vllm_cpu(query, keys, values, head_size ** -0.5)
    want = causal_attention(query, keys, values, head_size ** -0.5)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
