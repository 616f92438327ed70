"""Shared fixtures: models built offline once per machine (under .models/).

Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before
triton is first imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from attentionpack_vllm import models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama():
    return models.build_tiny_llama(models.default_models_dir() / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llava():
    return models.build_tiny_llava(models.default_models_dir() / "tiny-llava")


@pytest.fixture(scope="session")
def llava_geometry_model():
    """LLaVA-1.5-7B's attention geometry (32 heads x 128, MHA), two layers, random weights."""
    return models.build_attention_geometry_model(models.default_models_dir() / "llava7b-geometry")


@pytest.fixture(scope="session")
def smollm2():
    return models.convert_smollm2(models.default_models_dir() / "smollm2-135m-instruct")
