"""Offline model builders: each folder loads in transformers, has the promised shape and
generates; a second build is a no-op. vLLM is not started here (it takes tens of seconds
per model)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (AutoModelForCausalLM, AutoProcessor, AutoTokenizer,
                          LlavaForConditionalGeneration)

from attentionpack_vllm import models


HEADS = ("num_attention_heads", "num_key_value_heads", "head_dim")


def read_json(folder, name):
    return json.loads((folder / name).read_text())


def fields(config, *keys):
    return tuple(config[k] for k in keys)


def file_times(folder):
    return {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}


def assert_rebuild_is_noop(build, folder, **kwargs):
    before = file_times(folder)
    assert build(folder, **kwargs) == folder
    assert file_times(folder) == before


def greedy(model, inputs, n=4):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def assert_vllm_tokenizer_files(folder):
    config = read_json(folder, "tokenizer_config.json")
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for token in (tokenizer.bos_token, tokenizer.eos_token):
        assert token in tokenizer.get_vocab()
    return tokenizer


def test_tiny_llama(tmp_path):
    folder = models.build_tiny_llama(tmp_path / "llama")
    config = read_json(folder, "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert fields(config, "hidden_size", "num_hidden_layers", "intermediate_size") == (128, 2, 256)
    assert fields(config, *HEADS) == (4, 2, 32)
    assert config["max_position_embeddings"] == 2048 and config["dtype"] == "float32"
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]

    tokenizer = assert_vllm_tokenizer_files(folder)
    assert config["vocab_size"] == len(tokenizer) and 512 <= len(tokenizer) <= 1000
    assert tokenizer("Hello").input_ids[0] == tokenizer.bos_token_id
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>USER: Hi\nASSISTANT: Hello</s>\nUSER: Bye\nASSISTANT:"
    assert read_json(folder, "generation_config.json")["eos_token_id"] == tokenizer.eos_token_id

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float32
    tokens = greedy(model, tokenizer("Hello world", return_tensors="pt"))
    assert len(tokens) == 4 and all(0 <= t < len(tokenizer) for t in tokens)
    assert_rebuild_is_noop(models.build_tiny_llama, folder)


def first_q_proj(folder):
    with safe_open(folder / "model.safetensors", "pt") as f:
        return f.get_tensor("model.layers.0.self_attn.q_proj.weight")


def test_seed_decides_the_weights(tmp_path):
    a, b, c = (models.build_tiny_llama(tmp_path / name, seed=seed)
               for name, seed in [("a", 0), ("b", 0), ("c", 1)])
    assert torch.equal(first_q_proj(a), first_q_proj(b))
    assert not torch.equal(first_q_proj(a), first_q_proj(c))


def gradient_image():
    y, x = np.mgrid[0:60, 0:80]
    return Image.fromarray(np.stack([x * 3, y * 4, x + y], -1).astype(np.uint8))


def test_tiny_llava(tmp_path):
    folder = models.build_tiny_llava(tmp_path / "llava")
    config = read_json(folder, "config.json")
    vision, text = config["vision_config"], config["text_config"]
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert fields(vision, "image_size", "patch_size", "model_type") == (56, 14, "clip_vision_model")
    assert config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default"
    assert fields(text, *HEADS) == (4, 2, 32)

    tokenizer = assert_vllm_tokenizer_files(folder)
    assert tokenizer.convert_tokens_to_ids("<image>") == config["image_token_index"]
    assert text["vocab_size"] == len(tokenizer)
    # vLLM's loader wants the CLIP tower nested under `vision_model`.
    with safe_open(folder / "model.safetensors", "pt") as f:
        tower = [k for k in f.keys() if k.startswith("vision_tower.")]
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)

    processor = AutoProcessor.from_pretrained(folder)
    parts = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What is this?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": parts}],
                                           add_generation_prompt=True)
    assert prompt == "<s>USER: <image>\n<image>\nWhat is this?\nASSISTANT:"
    inputs = processor(images=[gradient_image()] * 2, text=prompt, return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 56, 56)
    assert int((inputs["input_ids"] == config["image_token_index"]).sum()) == 2 * 16

    model, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert len(greedy(model, inputs)) == 4
    assert_rebuild_is_noop(models.build_tiny_llava, folder)


def test_llava_135m_wraps_a_llama_of_smollm2s_shape(smollm2):
    """The image serving model's language model has SmolLM2-135M's shape (its compute per
    token) around the tiny LLaVA's vision tower; the builder is the tiny LLaVA's."""
    tokenizer = models.build_tokenizer(with_images=True)
    config = models._llava_config(tokenizer, models._smollm2_shaped_llama_config(tokenizer))
    text, reference = config.text_config, read_json(smollm2, "config.json")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size"):
        assert getattr(text, key) == reference[key], key
    assert text.head_dim == reference["hidden_size"] // reference["num_attention_heads"]
    assert text.vocab_size == len(tokenizer)
    tiny = models._llava_config(tokenizer, models._tiny_llama_config(tokenizer))
    assert config.vision_config.to_dict() == tiny.vision_config.to_dict()
    assert config.image_token_index == tiny.image_token_index


def test_attention_geometry_model(tmp_path):
    geometry = dict(num_heads=4, num_kv_heads=2, head_size=64, num_layers=3)
    folder = models.build_attention_geometry_model(tmp_path / "geometry", **geometry)
    config = read_json(folder, "config.json")
    assert fields(config, *HEADS) == (4, 2, 64)
    assert config["hidden_size"] == 4 * 64 and config["num_hidden_layers"] == 3
    assert config["vocab_size"] <= 1000 and config["intermediate_size"] == 256

    tokenizer = assert_vllm_tokenizer_files(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert len(greedy(model, tokenizer("Hello world", return_tensors="pt"))) == 4
    assert_rebuild_is_noop(models.build_attention_geometry_model, folder, **geometry)


def test_default_models_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(models.MODELS_DIR_ENV, raising=False)
    repo_root = Path(models.__file__).resolve().parent.parent
    assert models.default_models_dir() == repo_root / ".models"
    monkeypatch.setenv(models.MODELS_DIR_ENV, str(tmp_path))
    assert models.default_models_dir() == tmp_path


def test_cli_prints_path_and_summary(tmp_path, capsys):
    assert models.main(["tiny-llama", "--out", str(tmp_path / "cli")]) == 0
    path, summary = capsys.readouterr().out.splitlines()
    assert path == str(tmp_path / "cli")
    assert summary.startswith("LlamaForCausalLM: 2 layers, 4 heads / 2 KV heads x 32")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    return models.convert_smollm2(tmp_path_factory.mktemp("smollm2"))


def test_smollm2(smollm2):
    config = read_json(smollm2, "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert fields(config, "num_hidden_layers", *HEADS) == (30, 9, 3, 64)
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] > 0

    tokenizer = assert_vllm_tokenizer_files(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert model.dtype == torch.float32
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    answer = tokenizer.decode(greedy(model, inputs, n=8))
    assert "Paris" in answer
    assert_rebuild_is_noop(models.convert_smollm2, smollm2)
