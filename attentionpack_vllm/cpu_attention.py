"""Exact prefill attention through vLLM's own CPU attention kernel.

`prefill.causal_attention` (PyTorch SDPA) is the reference. On CPU vLLM ships a fused
C++ paged-attention kernel (`cpu_attention_with_kv_cache`, the one its CPU backend
runs), about 2.5x faster than SDPA on a 768-token SmolLM2 prompt here. This module
feeds it: the keys and values a prefill attends to are written into a scratch
dense cache in the kernel's page layout, then one call attends the chunk's queries
causally (query i at position total - n + i), in float32 like the reference.
"""
from __future__ import annotations

import functools

import torch

BLOCK_SIZE = 16  # rows per scratch page (a size every ISA of the kernel accepts)


@functools.lru_cache(maxsize=None)
def _isa(head_size: int) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa  # the CPU backend's own choice

    return _get_attn_isa(torch.float32, BLOCK_SIZE, head_size)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether this vLLM build has the CPU attention kernel (loading vLLM's ops if needed)."""
    try:
        from vllm import _custom_ops  # noqa: F401  (registers torch.ops._C)

        return hasattr(torch.ops._C, "cpu_attention_with_kv_cache")
    except (ImportError, AttributeError, RuntimeError):
        return False


def causal_attention_vllm_cpu(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                              scale: float) -> torch.Tensor:
    """Same contract as `prefill.causal_attention`: query [n, num_heads, head_size]; keys,
    values [ctx + n, kv_width]; returns [n, num_heads, head_size] in the query's dtype."""
    from vllm import _custom_ops as ops

    n, num_heads, head_size = query.shape
    total = keys.shape[0]
    num_kv_heads = keys.shape[1] // head_size
    isa = _isa(head_size)
    blocks = -(-total // BLOCK_SIZE)
    # Zeroed: the kernel reads whole pages, and a stale NaN past `total` would leak (0 * NaN).
    cache = torch.zeros(blocks, num_kv_heads, 2 * BLOCK_SIZE, head_size, dtype=torch.float32,
                        device=query.device)
    key_cache, value_cache = cache.chunk(2, dim=2)
    positions = torch.arange(total, device=query.device)
    ops.cpu_attn_reshape_and_cache(keys.float().view(total, num_kv_heads, head_size),
                                   values.float().view(total, num_kv_heads, head_size),
                                   key_cache, value_cache, positions, isa)
    query_start = torch.tensor([0, n], dtype=torch.int32)
    seq_lens = torch.tensor([total], dtype=torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_size,
        seq_lens=seq_lens, dtype=torch.float32, query_start_loc=query_start, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=False)
    out = torch.empty(n, num_heads, head_size, dtype=torch.float32, device=query.device)
    ops.cpu_attention_with_kv_cache(
        query=query.float().contiguous(), key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=query_start, seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None,
        sliding_window=-1, block_table=torch.arange(blocks, dtype=torch.int32)[None], softcap=0.0,
        scheduler_metadata=metadata, s_aux=None)
    return out.to(query.dtype)
