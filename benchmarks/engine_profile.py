#!/usr/bin/env python
"""Where the engine's time goes on this CPU: vLLM's own backend and AttentionPack, in-process.

Runs a serving mix's request shape (`--mix text`, the default, or `image-135m`:
`--num-prompts` prompts of `--input-len` random token ids, for the image mix after one
random 56x56 image, `--output-len` generated tokens each, all submitted at once) through
`vllm.LLM` in one fresh process per backend, with the serving benchmark's engine
settings for that mix (its model, float32, eager, blocks of 32, the same KV cache bytes
and `--max-num-seqs`, one image per prompt), under cProfile. No HTTP server and no
benchmark client share the cores, so the totals show the engine alone. Reported per
backend: the wall time of the whole run, the engine steps, and the time of the calls
that make the difference:

- the model's linear layers (vLLM's `onednn_mm`), the same work per token in both;
- vLLM's CPU attention kernel (dense: all attention; AttentionPack: the prefill's);
- AttentionPack's attention layer as a whole, and inside it the decode attention (the
  compiled CPU kernel or the PyTorch path), the prefill's factorisation into records
  (`compress_tokens`), the window folds, and all `torch.linalg.eigh` calls.

    .venv/bin/python benchmarks/engine_profile.py --max-num-seqs 24
    .venv/bin/python benchmarks/engine_profile.py --mix image-135m --tag image-135m

Writes results/engine_profile[_<tag>].json. About 2 minutes here for the text mix, 4 for
image-135m. The cProfile overhead
falls on Python calls, which both backends make per layer; the compiled calls are
timed as they are.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _cli import parse_settings, save_json
from _environment import environment
from serving_throughput import MIX_DEFAULTS, MIXES, ONE_IMAGE

PROFILED_MIXES = ("text", "image-135m")  # the serving benchmark's mixes, the same requests and budgets

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("dense", "attentionpack")

# part: (file name ending, function name, "tottime" (own time) or "cumtime" (with callees)).
PARTS = {
    "model_linear_layers": ("~", "<built-in method torch._ops._C.onednn_mm>", "tottime"),
    "vllm_cpu_attention_kernel": ("~", "<built-in method torch._ops._C.cpu_attention_with_kv_cache>", "tottime"),
    "attentionpack_attention_layer": ("attentionpack_vllm/backend.py", "forward", "cumtime"),
    "attentionpack_decode_attention": ("kernels/latent_decode_cpu.py", "latent_decode_attention_cpu", "cumtime"),
    "attentionpack_decode_attention_torch": ("kernels/latent_decode_torch.py", "latent_decode_attention", "cumtime"),
    "attentionpack_prefill_factorisation": ("attentionpack_vllm/paged_store.py", "compress_tokens", "cumtime"),
    "attentionpack_window_folds": ("attentionpack_vllm/paged_store.py", "fold_windows", "cumtime"),
    "eigh": ("~", "<built-in method torch._C._linalg.linalg_eigh>", "tottime"),
}
STEP = ("gpu_model_runner.py", "execute_model")


def _sum(stats: dict, file_end: str, function: str, column: str) -> tuple[float, int]:
    """Seconds and calls of every profiled function named `function` in a file ending in `file_end`."""
    seconds, calls = 0.0, 0
    for (file, _, name), (_, ncalls, tottime, cumtime, _) in stats.items():
        if name == function and file.endswith(file_end):
            seconds += tottime if column == "tottime" else cumtime
            calls += ncalls
    return seconds, calls


def make_prompts(args) -> list[dict]:
    """`--num-prompts` prompts of `--input-len` random token ids; for an image mix each starts
    with the model's image token and carries one random image of the serving mix's size."""
    import random

    rng = random.Random(0)
    if not args.images:
        return [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(args.input_len)]}
                for _ in range(args.num_prompts)]
    import numpy as np
    from PIL import Image

    from attentionpack_vllm.models import LLAVA_IMAGE_SIZE

    config = json.loads((Path(args.model_dir) / "config.json").read_text())
    image_token, vocab = config["image_token_index"], config["text_config"]["vocab_size"]
    text_ids = [i for i in range(100, vocab) if i != image_token]
    pixels = np.random.default_rng(0).integers(0, 256, (args.num_prompts, LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE, 3))
    return [{"prompt_token_ids": [image_token] + [rng.choice(text_ids) for _ in range(args.input_len)],
             "multi_modal_data": {"image": Image.fromarray(pixels[i].astype(np.uint8))}}
            for i in range(args.num_prompts)]


def run_worker(backend: str, args) -> dict:
    """One backend in this process: build the engine, warm it up, profile the run."""
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    from vllm import LLM, SamplingParams

    engine = dict(dtype="float32", enforce_eager=True, max_model_len=args.input_len + args.output_len + 64,
                  max_num_seqs=args.max_num_seqs, kv_cache_memory_bytes=args.kv_bytes, seed=0, block_size=32)
    if args.images:
        engine.update(limit_mm_per_prompt=json.loads(ONE_IMAGE))  # as the serving mix's servers
    if backend == "attentionpack":
        engine.update(attention_backend="attentionpack", additional_config={"attentionpack": args.settings})
    else:
        engine.update(enable_prefix_caching=False)  # as AttentionPack, which turns it off
    llm = LLM(model=str(args.model_dir), **engine)
    prompts = make_prompts(args)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    llm.generate(prompts, params, use_tqdm=False)
    profile.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profile).stats
    parts = {}
    for part, (file_end, function, column) in PARTS.items():
        seconds, calls = _sum(stats, file_end, function, column)
        if calls:
            parts[part] = {"seconds": round(seconds, 3), "calls": calls}
    return {"total_seconds": round(total, 3), "engine_steps": _sum(stats, *STEP, "cumtime")[1],
            "requests_per_second": round(args.num_prompts / total, 4), "parts": parts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mix", choices=PROFILED_MIXES, default="text",
                   help="the serving benchmark's mix whose requests, model and budget to run (default text)")
    for name, kind in (("num_prompts", int), ("input_len", int), ("output_len", int), ("kv_bytes", int),
                       ("max_num_seqs", int), ("settings", str)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help="default: the mix's, " + ", ".join(f"{m} {MIX_DEFAULTS[m][name]}" for m in PROFILED_MIXES))
    p.add_argument("--tag", default="", help="suffix of the results file (engine_profile[_<tag>])")
    p.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, value in MIX_DEFAULTS[args.mix].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("num_prompts", "input_len", "output_len", "kv_bytes", "max_num_seqs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    args.settings = parse_settings(p, args.settings)
    from attentionpack_vllm import models
    from attentionpack_vllm.config import AttentionPackConfig, AttentionPackConfigError

    try:  # a bad setting is named now, not after the dense run
        AttentionPackConfig.from_dict(args.settings)
    except AttentionPackConfigError as exc:
        p.error(f"--settings: {exc}")

    builder, folder, mix_args, _ = MIXES[args.mix]
    args.images = "random-mm" in mix_args  # the image dataset: one image per prompt
    args.model_dir = builder(models.default_models_dir() / folder)
    if args.worker:  # a child: one backend, its figures to --worker-out
        Path(args.worker_out).write_text(json.dumps(run_worker(args.worker, args)))
        return 0

    result = {"command": shlex.join(["python", "benchmarks/engine_profile.py", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "environment": environment(),
              "mix": args.mix, "model": folder, "num_prompts": args.num_prompts, "input_len": args.input_len,
              "output_len": args.output_len, "kv_cache_memory_bytes": args.kv_bytes,
              "max_num_seqs": args.max_num_seqs, "attentionpack_settings": args.settings, "backends": {}}
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for backend in BACKENDS:
        print(f"[engine] {backend}: {args.num_prompts} requests of {args.input_len} + {args.output_len} tokens, "
              "profiled in-process ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--worker", backend,
                                   "--worker-out", str(out)], capture_output=True, text=True)
            if proc.returncode or not out.exists():
                raise SystemExit(f"the {backend} run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            row = json.loads(out.read_text())
        result["backends"][backend] = row
        print(f"[engine] {backend}: {row['total_seconds']:.1f} s, {row['engine_steps']} steps, "
              f"{row['requests_per_second']:.3f} requests/s", flush=True)
        for part, figures in row["parts"].items():
            print(f"[engine]   {part}: {figures['seconds']:.2f} s ({figures['calls']} calls)", flush=True)
    dense, packed = (result["backends"][b]["total_seconds"] for b in BACKENDS)
    result["requests_per_second_ratio"] = round(dense / packed, 3)
    print(f"[engine] AttentionPack / dense, requests/s: {dense / packed:.2f}x")
    path = save_json(RESULTS, "engine_profile", args.tag, result)
    print(f"[engine] saved {path.relative_to(RESULTS.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
