"""The plugin's entry point: declared, and importable without vLLM."""
import importlib.metadata
import subprocess
import sys


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.name == "attentionpack" and ep.value == "attentionpack_vllm.plugin:register" for ep in eps)


def test_plugin_and_core_import_without_vllm():
    code = ("import sys; sys.modules['vllm'] = None\n"  # any vLLM import would now fail
            "import attentionpack_vllm.plugin, attentionpack_vllm.decode, attentionpack_vllm.prefill\n"
            "import attentionpack_vllm.kernels.latent_decode_torch\n"
            "assert callable(attentionpack_vllm.plugin.register)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_slot_pools_come_out_of_a_set_kv_budget(monkeypatch):
    import types

    import pytest

    from attentionpack_vllm import plugin, runtime

    monkeypatch.setattr(runtime.STATE, "pool_bytes", 300)
    assert plugin.take_pools_out(1000) == 700
    with pytest.raises(ValueError, match="slot pools .300 bytes.*do not fit the KV cache budget "
                                         ".300 bytes.*--kv-cache-memory-bytes"):
        plugin.take_pools_out(300)
    # GPU: a budget set with --kv-cache-memory-bytes loses the pools; a profiled one
    # already counted them (allocated with the weights, before profiling).
    assert plugin.gpu_budget(types.SimpleNamespace(kv_cache_memory_bytes=1000), 1000) == 700
    assert plugin.gpu_budget(types.SimpleNamespace(kv_cache_memory_bytes=None), 1000) == 1000
    monkeypatch.setattr(runtime.STATE, "pool_bytes", 0)
    assert plugin.take_pools_out(1000) == 1000


def test_worker_budget_hooks_are_installed():
    from attentionpack_vllm import plugin

    plugin.install_worker_hooks()
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    for cls in (CPUWorker, Worker):
        assert getattr(cls.determine_available_memory, plugin._PATCHED, False), cls
