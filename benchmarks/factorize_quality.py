#!/usr/bin/env python
"""Factorisation methods on SmolLM2-135M-Instruct's real keys and values: accuracy and fold drift.

The post-RoPE keys and values (3 KV heads x 64 concatenated: width 192) of all 30
layers are captured from one forward pass over the Python reference's "Execution
model" chapter (60 matrices).

1. Accuracy: each method's captured energy at rank 64 over exact SVD's, on the first
   256 tokens and on all of them, and for the first 16 columns (a partial-rank group).
2. Drift: each layer's K and V compressed as a request would be: the first 256 tokens
   factorised at rank 64 (`factorize_batch`), then windows of 32 tokens folded in one
   after another (`fold_batch`). After every fold the relative Frobenius error over
   all tokens so far is compared with a fresh rank-64 SVD of the same tokens;
   "decode tokens" restricts both to the folded tokens.

    python benchmarks/factorize_quality.py [--folds 10] [--methods exact gram randomized]

Also recorded for layer 29's values: a fresh SVD of the decode tokens alone (their
own rank-64 basis), the figure an earlier measurement compared against. Saves
results/factorize_quality.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _environment import environment  # noqa: E402

from attentionpack_vllm.factorize import (LowRank, SvdSettings, captured_energy,  # noqa: E402
                                          factorize_batch, fold_batch)
from attentionpack_vllm.models import convert_smollm2, default_models_dir  # noqa: E402

PREFILL, WINDOW, RANK = 256, 32, 64
TEXT_TOPIC = "execmodel"


def capture_kv(tokens: int) -> torch.Tensor:
    """[60, tokens, 192]: keys and values of layers 0..29 (K, V alternating), after RoPE."""
    import pydoc_data.topics as topics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = convert_smollm2(default_models_dir() / "smollm2-135m-instruct", print)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(topics.topics[TEXT_TOPIC]).input_ids[:tokens]
    with torch.inference_mode():
        cache = model(input_ids=torch.tensor(ids)[None], use_cache=True, logits_to_keep=1).past_key_values
    flat = lambda t: t[0].transpose(0, 1).reshape(t.shape[2], -1)  # noqa: E731
    return torch.stack([flat(t) for layer in cache.layers for t in (layer.keys, layer.values)]).float()


def relative_errors(x: torch.Tensor, low: LowRank) -> torch.Tensor:
    return (1 - captured_energy(x, low)).clamp_min(0).sqrt()


def accuracy(kv: torch.Tensor, method: str, say) -> dict:
    """Captured energy at rank 64 over exact SVD's: the smallest ratio of the 60 matrices."""
    out = {}
    for name, x in (("prefill", kv[:, :PREFILL]), ("all", kv)):
        exact = factorize_batch(x, RANK, SvdSettings("exact"))
        low = factorize_batch(x, RANK, SvdSettings(method))
        for columns in (RANK, 16):
            ratio = captured_energy(x, low, columns) / captured_energy(x, exact, columns)
            out[f"{name}_{columns}_columns"] = dict(min=float(ratio.min()), mean=float(ratio.mean()),
                                                    worst=f"layer {int(ratio.argmin()) // 2} "
                                                          f"{'KV'[int(ratio.argmin()) % 2]}")
    say(f"{method:<10} captured energy / exact at rank {RANK}: {x.shape[1]} tokens min "
        f"{out['all_64_columns']['min']:.5f}, first 16 columns min {out['all_16_columns']['min']:.5f}; "
        f"{PREFILL} tokens min {out['prefill_64_columns']['min']:.5f}")
    return out


def run(kv: torch.Tensor, method: str, folds: int, say) -> dict:
    settings = SvdSettings(method)
    low = factorize_batch(kv[:, :PREFILL], RANK, settings)
    factors, basis = low.factors, low.basis
    steps = []
    for fold in range(1, folds + 1):
        start = PREFILL + (fold - 1) * WINDOW
        result = fold_batch(factors, basis, kv[:, start:start + WINDOW], RANK, settings)
        factors = torch.cat([factors @ result.rotation, result.new_factors], dim=1)
        basis = result.basis
        data = kv[:, :start + WINDOW]
        fresh = factorize_batch(data, RANK, SvdSettings("exact"))
        folded_err = relative_errors(data, LowRank(factors, basis))
        fresh_err = relative_errors(data, fresh)
        decode = slice(PREFILL, start + WINDOW)
        folded_dec = relative_errors(data[:, decode], LowRank(factors[:, decode], basis))
        fresh_dec = relative_errors(data[:, decode], LowRank(fresh.factors[:, decode], fresh.basis))
        alone = relative_errors(data[:, decode], factorize_batch(data[:, decode], RANK, SvdSettings("exact")))
        ratio = folded_err / fresh_err
        steps.append(dict(
            fold=fold, tokens=start + WINDOW, ratio_max=float(ratio.max()), ratio_mean=float(ratio.mean()),
            worst=f"layer {int(ratio.argmax()) // 2} {'KV'[int(ratio.argmax()) % 2]}",
            decode_ratio_max=float((folded_dec / fresh_dec).max()),
            layer29_v=dict(folded=float(folded_err[59]), fresh=float(fresh_err[59]),
                           folded_decode_tokens=float(folded_dec[59]), fresh_decode_tokens=float(fresh_dec[59]),
                           decode_tokens_alone_fresh=float(alone[59]))))
        say(f"{method:<10} fold {fold:>2} ({start + WINDOW} tokens): error / fresh SVD max {ratio.max():.4f} "
            f"({steps[-1]['worst']}), mean {ratio.mean():.4f}; decode tokens max "
            f"{steps[-1]['decode_ratio_max']:.4f}; layer 29 V {folded_err[59]:.4f} vs {fresh_err[59]:.4f} "
            f"(its decode tokens' own SVD: {alone[59]:.4f})")
    return dict(method=method, accuracy=accuracy(kv, method, say), steps=steps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=["exact", "gram", "randomized"],
                   choices=["exact", "gram", "randomized"])
    p.add_argument("--out", type=Path, default=HERE / "results" / "factorize_quality.json")
    args = p.parse_args(argv)
    started = time.time()

    def say(line):
        print(f"[{time.time() - started:6.1f} s] {line}", flush=True)

    kv = capture_kv(PREFILL + WINDOW * args.folds)
    say(f"captured {tuple(kv.shape)}")
    result = dict(
        command=shlex.join([sys.executable] + sys.argv),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        environment=environment(), model="SmolLM2-135M-Instruct (float32)", kv_width=kv.shape[-1],
        text=f"pydoc_data.topics.topics[{TEXT_TOPIC!r}]", prefill=PREFILL, window=WINDOW, rank=RANK,
        folds=args.folds,
        note=("ratio = relative Frobenius error of the folded factorisation over a fresh rank-64 SVD of the "
              "same tokens, per layer and matrix (60); decode = the folded tokens only, both factorisations "
              "restricted to them; decode_tokens_alone_fresh = a rank-64 SVD of the folded tokens by "
              "themselves (their own basis)"),
        runs=[run(kv, method, args.folds, say) for method in args.methods])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    say(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
