"""The most tokens of each modality one request can hold (`token_bounds`), and their trip
to the workers (`runtime.ship_request_tokens`)."""
import types

import pytest

from attentionpack_vllm import runtime, token_bounds
from attentionpack_vllm.plan import RequestTokens


def model_config(multimodal=True, embeds=False, max_len=2048):
    mm = types.SimpleNamespace(enable_mm_embeds=embeds)
    return types.SimpleNamespace(max_model_len=max_len, is_multimodal_model=multimodal,
                                 get_multimodal_config=lambda: mm)


@pytest.fixture
def processor(monkeypatch):
    """A multimodal processor allowing `limits` items per prompt of `per_item` tokens each."""
    state = types.SimpleNamespace(limits={"image": 2, "video": 0}, per_item={"image": 576}, error=None)

    def create_processor(_config):
        if state.error:
            raise state.error
        return types.SimpleNamespace(info=types.SimpleNamespace(allowed_mm_limits=state.limits))

    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal import encoder_budget
    monkeypatch.setattr(MULTIMODAL_REGISTRY, "create_processor", create_processor)
    monkeypatch.setattr(encoder_budget, "get_mm_max_toks_per_item",
                        lambda _p, counts, cache: {m: state.per_item[m] for m in counts if m in state.per_item})
    return state


def test_images_bounded_by_items_times_tokens_per_item_and_max_model_len(processor):
    assert token_bounds.request_tokens(model_config()) == RequestTokens(text=2048, image=1152)
    processor.limits = {"image": 999}
    assert token_bounds.request_tokens(model_config()) == RequestTokens(text=2048, image=2048)


def test_text_only_models_and_unknown_bounds(processor, caplog):
    assert token_bounds.request_tokens(model_config(multimodal=False)) == RequestTokens(text=2048, image=0)
    # Precomputed embeddings bypass the processor; a modality sharing another's placeholders
    # has no count of its own; a processor that fails says why. None bounds the images.
    assert token_bounds.request_tokens(model_config(embeds=True)) == RequestTokens(text=2048, image=2048)
    processor.limits = {"image": 1, "audio": 1}
    assert token_bounds.request_tokens(model_config()) == RequestTokens(text=2048, image=2048)
    processor.error = ValueError("no registered multimodal processor")
    with caplog.at_level("WARNING", logger="vllm.attentionpack"):
        assert token_bounds.request_tokens(model_config()) == RequestTokens(text=2048, image=2048)
    assert "could not read the most image tokens" in caplog.text
    assert "no registered multimodal processor" in caplog.text


def test_bounds_travel_in_additional_config_beside_the_settings():
    args = types.SimpleNamespace(additional_config={"attentionpack": {"rank": 64}})
    runtime.ship_request_tokens(args, RequestTokens(text=1024, image=16))
    assert args.additional_config["attentionpack"] == {"rank": 64}
    assert runtime.shipped_request_tokens(args) == RequestTokens(text=1024, image=16)
    assert runtime.config_from_vllm(args).rank_vision_key == 64  # the settings still validate
    assert runtime.shipped_request_tokens(types.SimpleNamespace(additional_config=None)) == RequestTokens()
    assert runtime.shipped_request_tokens(None) == RequestTokens()
