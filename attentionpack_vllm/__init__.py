"""AttentionPack for vLLM: low-rank, modality-separated KV cache compression.

The math lives in plain modules (config, factorize, paged_store, latent_attention,
partial_rank, recompress, reference) that import torch only; the vLLM glue lives in
`plugin` and `backend`.
"""
__version__ = "0.1.0"
