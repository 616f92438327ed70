"""The most tokens of each modality one request can hold, as the served model bounds them.

A slot's basis plane never needs more rows than its modality has tokens
(`plan.RequestTokens`). vLLM bounds both modalities before any request arrives:

* text: `max_model_len`;
* images (every modality that reaches the model as placeholder tokens: images,
  videos): for each modality, the items a prompt may carry (`--limit-mm-per-prompt`,
  within what the model supports) times the most tokens one item becomes, which
  vLLM's multimodal processor reports, as it does for its own encoder budget.

With vLLM's default of 999 items per prompt the image bound is `max_model_len`; with
`--limit-mm-per-prompt '{"image": 1}'` on a model whose image is 16 tokens, image
planes take 16 rows instead of the rank's 80.
"""
from __future__ import annotations

from vllm.logger import init_logger

from .plan import RequestTokens

logger = init_logger("vllm.attentionpack")


def request_tokens(model_config) -> RequestTokens:
    """The bounds for the served model's `model_config` (the top-level one: the multimodal
    processor is looked up by its architecture). Computed once at start-up
    (`engine_setup.prepare_engine`) and shipped to the workers with the config
    (`runtime.shipped_request_tokens`)."""
    max_len = int(model_config.max_model_len)
    if not model_config.is_multimodal_model:
        return RequestTokens(text=max_len, image=0)
    if model_config.get_multimodal_config().enable_mm_embeds:
        # Precomputed embeddings bypass the processor's per-item bound.
        return RequestTokens(text=max_len, image=max_len)
    try:
        from vllm.multimodal import MULTIMODAL_REGISTRY
        from vllm.multimodal.encoder_budget import get_mm_max_toks_per_item

        processor = MULTIMODAL_REGISTRY.create_processor(model_config)
        limits = {m: n for m, n in processor.info.allowed_mm_limits.items() if n > 0}
        per_item = get_mm_max_toks_per_item(processor, dict.fromkeys(limits, 1), cache=None)
    except Exception as error:  # noqa: BLE001 - no bound is never wrong, only larger
        logger.warning("AttentionPack: could not read the most image tokens a request can hold "
                       "(%s: %s); image bases keep their full rank", type(error).__name__, error)
        return RequestTokens(text=max_len, image=max_len)
    if set(limits) - set(per_item):
        # A modality without its own placeholder tokens (shared with another): no bound of its own.
        return RequestTokens(text=max_len, image=max_len)
    image = sum(limits[m] * int(per_item[m]) for m in limits)
    return RequestTokens(text=max_len, image=min(image, max_len))
