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
