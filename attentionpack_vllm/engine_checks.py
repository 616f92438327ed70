"""Startup checks: engine features that cannot work with per-request compressed pages.

Pages hold factors in a basis private to one request, so anything that shares pages
across requests, reads them as dense K/V, or moves them elsewhere is refused with a
message naming the setting. Prefix caching, which vLLM turns on by default, is
switched off instead (with a warning).
"""
from __future__ import annotations

from dataclasses import dataclass


class AttentionPackUnsupportedError(ValueError):
    """A requested engine feature conflicts with --attention-backend attentionpack."""


@dataclass(frozen=True)
class EngineFeatures:
    speculative_decoding: bool = False
    kv_transfer: bool = False
    kv_offloading: bool = False
    decode_context_parallel_size: int = 1
    prefill_context_parallel_size: int = 1
    kv_cache_dtype: str = "auto"
    sliding_window: bool = False
    encoder_decoder: bool = False
    mla: bool = False


def conflicts(features: EngineFeatures) -> list[str]:
    """One message per conflicting feature, each naming the setting to change."""
    reasons = []
    if features.speculative_decoding:
        reasons.append("speculative decoding (--speculative-config) verifies several tokens per "
                       "step against compressed pages; remove --speculative-config")
    if features.kv_transfer:
        reasons.append("KV connectors (--kv-transfer-config) move pages as dense K/V; "
                       "remove --kv-transfer-config")
    if features.kv_offloading:
        reasons.append("KV offloading (--kv-offloading-size / --kv-offloading-backend) moves pages "
                       "as dense K/V; remove it")
    if features.decode_context_parallel_size > 1 or features.prefill_context_parallel_size > 1:
        reasons.append("context parallelism (--decode-context-parallel-size / "
                       "--prefill-context-parallel-size > 1) splits a request's pages across ranks; "
                       "use 1")
    if features.kv_cache_dtype not in ("auto", None):
        reasons.append(f"--kv-cache-dtype {features.kv_cache_dtype}: AttentionPack sets its own "
                       "storage (8-bit by default, the attentionpack setting \"storage\": \"int8\"; "
                       "\"auto\" for the model's dtype); use --kv-cache-dtype auto")
    if features.sliding_window:
        reasons.append("sliding-window attention layers are not supported; serve this model "
                       "with another --attention-backend")
    if features.encoder_decoder:
        reasons.append("encoder-decoder models are not supported; serve this model with another "
                       "--attention-backend")
    if features.mla:
        reasons.append("MLA models already store a latent cache; serve this model with another "
                       "--attention-backend")
    return reasons


def raise_on_conflicts(features: EngineFeatures) -> None:
    reasons = conflicts(features)
    if reasons:
        raise AttentionPackUnsupportedError(
            "--attention-backend attentionpack cannot run with: " + "; ".join(reasons))
