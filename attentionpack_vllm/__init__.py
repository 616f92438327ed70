"""AttentionPack for vLLM: low-rank, modality-separated KV cache compression.

The math lives in plain modules (config, plan, factorize, slot_pool, paged_store,
prefill, decode, importance, windows, memory, and the `kernels` subpackage) that
import torch only; the vLLM glue lives in `plugin`, `backend`, `engine_setup` and
`runtime`.
"""
__version__ = "0.1.0"
