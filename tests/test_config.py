"""Settings: defaults, the dict form, and every invalid value's message."""
import pytest

from attentionpack_vllm.config import AttentionPackConfig, AttentionPackConfigError


def test_defaults():
    """Rank 80 with int8 storage (chosen in benchmarks/quality.py for retrieval); the
    paper's partial-rank groups, off."""
    c = AttentionPackConfig.from_dict(None)
    assert (c.rank_vision_key, c.rank_vision_value, c.rank_text_key, c.rank_text_value) == (80, 80, 80, 80)
    assert c.storage == "int8" and c.rank_text_energy == 1.0
    assert c.window_size == 64 and c.sink_tokens == 4
    assert c.group_fractions == (0.25, 0.75) and c.group_rank_scales == (1.0, 0.25)
    assert not c.partial_rank_values and not c.partial_rank_keys
    assert c.ema_weight == 0.25 and c.svd == "auto" and c.svd_oversample == 16


def test_from_dict_rank_shorthand_and_overrides():
    c = AttentionPackConfig.from_dict({"rank": 32, "rank_text_value": 96, "group_fractions": [0.5, 0.5]})
    assert (c.rank_vision_key, c.rank_vision_value, c.rank_text_key, c.rank_text_value) == (32, 32, 32, 96)
    assert c.group_fractions == (0.5, 0.5)
    assert AttentionPackConfig.from_dict(c.to_dict()) == c


def test_ranks_clamp_to_layer_width_and_groups_round_up():
    c = AttentionPackConfig.from_dict({"rank": 100})
    assert set(c.effective_ranks(64).values()) == {64}
    assert c.group_ranks(10, partial=True) == (10, 3)
    assert c.group_ranks(10, partial=False) == (10, 10)


@pytest.mark.parametrize("settings,key,accepted", [
    ({"rank_vision_key": 0}, "rank_vision_key", "an integer >= 1"),
    ({"rank_text_value": 12.5}, "rank_text_value", "an integer >= 1"),
    ({"rank": "64"}, "rank_vision_key", "an integer >= 1"),
    ({"rank_text_key": True}, "rank_text_key", "an integer >= 1"),
    ({"window_size": 0}, "window_size", "an integer >= 1"),
    ({"svd_power_iters": -1}, "svd_power_iters", "an integer >= 0"),
    ({"sink_tokens": -1}, "sink_tokens", "an integer >= 0"),
    ({"sink_tokens": 2.0}, "sink_tokens", "an integer >= 0"),
    ({"group_fractions": [0.3, 0.3]}, "group_fractions", "fractions summing to 1"),
    ({"group_fractions": [1.5, -0.5]}, "group_fractions", "numbers in [0, 1]"),
    ({"group_fractions": []}, "group_fractions", "a non-empty list of numbers"),
    ({"group_fractions": 0.25}, "group_fractions", "a list of numbers"),
    ({"group_rank_scales": [1.0]}, "group_rank_scales", "one scale per group"),
    ({"group_rank_scales": [0.5, 0.25]}, "group_rank_scales", "first scale is 1.0"),
    ({"group_rank_scales": [1.0, 0.0]}, "group_rank_scales", "numbers in (0, 1]"),
    ({"group_fractions": [0.2, 0.3, 0.5], "group_rank_scales": [1.0, 0.25, 0.5]},
     "group_rank_scales", "non-increasing"),
    ({"rank_text_energy": 0}, "rank_text_energy", "a number in (0, 1]"),
    ({"rank_text_energy": 1.5}, "rank_text_energy", "a number in (0, 1]"),
    ({"rank_text_energy": "auto"}, "rank_text_energy", "a number in (0, 1]"),
    ({"ema_weight": 1.0}, "ema_weight", "a number in [0, 1)"),
    ({"ema_weight": -0.1}, "ema_weight", "a number in [0, 1)"),
    ({"ema_weight": "high"}, "ema_weight", "a number in [0, 1)"),
    ({"svd": "qr"}, "svd", "one of ['auto', 'exact', 'gram', 'gram32', 'randomized']"),
    ({"decode_kernel": "cuda"}, "decode_kernel", "one of ['auto', 'torch', 'triton', 'cpu']"),
    ({"partial_rank_keys": "yes"}, "partial_rank_keys", "true or false"),
    ({"rank_vison_key": 64}, "rank_vison_key", "a known setting"),
])
def test_invalid_settings_name_key_value_and_accepted(settings, key, accepted):
    with pytest.raises(AttentionPackConfigError) as err:
        AttentionPackConfig.from_dict(settings)
    assert err.value.key == key
    message = str(err.value)
    assert f"'{key}'" in message and accepted in message


def test_settings_must_be_an_object():
    with pytest.raises(AttentionPackConfigError, match="a JSON object of settings"):
        AttentionPackConfig.from_dict([("rank", 64)])
