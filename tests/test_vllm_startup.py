"""Start-up: backend selection, bad settings and conflicting features, before any engine runs."""
import pickle
import subprocess
import sys

import pytest

from attentionpack_vllm.config import AttentionPackConfigError
from attentionpack_vllm.engine_checks import AttentionPackUnsupportedError

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_registered():
    from attentionpack_vllm import plugin
    plugin.register()
    plugin.register()  # idempotent
    return plugin


@pytest.mark.parametrize("name", ["attentionpack", "ATTENTIONPACK", "AttentionPack", "CUSTOM", "custom"])
def test_backend_names_select_attentionpack(vllm_registered, name):
    assert vllm_registered.is_selected(name)


def test_other_backends_are_not_attentionpack(vllm_registered):
    assert not vllm_registered.is_selected("CPU_ATTN") and not vllm_registered.is_selected(None)


def test_alias_pickles_as_custom_for_spawned_processes(vllm_registered):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    member = AttentionBackendEnum["ATTENTIONPACK"]
    assert member is AttentionBackendEnum.CUSTOM
    assert pickle.loads(pickle.dumps(member)) is AttentionBackendEnum.CUSTOM


def test_cpu_platform_honours_the_selection(vllm_registered):
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    class Selector:
        use_mla = False
        use_sparse = False

    path = CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, Selector())
    assert path == "attentionpack_vllm.backend.AttentionPackBackend"
    assert CpuPlatform.get_attn_backend_cls(None, Selector()).endswith("CPUAttentionBackend")


def engine_config(model, settings=None, **engine):
    from vllm.engine.arg_utils import EngineArgs
    args = EngineArgs(model=str(model), attention_backend="attentionpack", dtype="float32",
                      max_model_len=512, enforce_eager=True,
                      additional_config={"attentionpack": settings or {}}, **engine)
    return args.create_engine_config()


def test_prefix_caching_is_switched_off_and_multimodal_ranges_requested(vllm_registered, tiny_llava):
    config = engine_config(tiny_llava, enable_prefix_caching=True)
    assert config.cache_config.enable_prefix_caching is False
    assert config.model_config.is_mm_prefix_lm


@pytest.mark.parametrize("settings,key", [
    ({"rank": 0}, "rank_vision_key"),
    ({"ema_weight": 1.5}, "ema_weight"),
    ({"group_fractions": [0.5, 0.2]}, "group_fractions"),
    ({"no_such_setting": 1}, "no_such_setting"),
])
def test_bad_settings_fail_at_config_time(vllm_registered, tiny_llama, settings, key):
    with pytest.raises(AttentionPackConfigError, match=f"'{key}'"):
        engine_config(tiny_llama, settings)


@pytest.mark.parametrize("engine,setting", [
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2,
                             "prompt_lookup_max": 3}}, "--speculative-config"),
    ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype"),
    ({"kv_offloading_size": 1.0}, "--kv-offloading-size"),
    ({"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}},
     "--kv-transfer-config"),
])
def test_conflicting_features_are_refused(vllm_registered, tiny_llama, engine, setting):
    with pytest.raises(AttentionPackUnsupportedError, match=setting):
        engine_config(tiny_llama, **engine)


def test_vllm_serve_exits_with_the_settings_message(tiny_llama):
    proc = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(tiny_llama),
         "--attention-backend", "attentionpack", "--port", "18999", "--host", "127.0.0.1",
         "--additional-config", '{"attentionpack": {"rank_text_value": -3}}'],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "attentionpack setting 'rank_text_value' = -3 is invalid: expected an integer >= 1" \
        in proc.stdout + proc.stderr
