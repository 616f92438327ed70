#!/usr/bin/env python
"""One layer's decode step on this CPU: AttentionPack's decode kernels against dense SDPA.

For each (batch, context) the script runs 40 consecutive decode steps of one layer at
SmolLM2-135M's attention geometry (9 query heads, 3 KV heads x 64), by default at rank
64 with a 32-token window (so one window fold falls in the run; `--settings` takes
other AttentionPack settings as JSON, `--settings '{}'` the package defaults, where
the 64-token window folds once in `--steps 70`), through `schedule_decode` (the per-step
metadata, once for all layers, timed apart) and `decode_and_fold` (window append,
latent attention, importance EMA with partial rank, the due folds). Dense is
`scaled_dot_product_attention` over contiguous K/V of the same length, a lower bound
for any dense paged kernel. Medians and means (the mean includes the fold step),
single-threaded, as vLLM's CPU worker computes on one core here. It also counts the
aten ops and host reads of one plain step (tests/op_counter.py's counter).

`--kernels` picks the latent attention, side by side (default `torch,cpu`): `torch` is
the PyTorch path (kernels/latent_decode_torch.py), `cpu` the compiled CPU kernel
(kernels/latent_decode_cpu.py, which also appends the new token; its metadata skips the
PyTorch path's index tensors), `compile` the PyTorch path under `torch.compile`.

    .venv/bin/python benchmarks/decode_step_cpu.py [--threads 1] [--storage auto,int8 --out F]
    .venv/bin/python benchmarks/decode_step_cpu.py --settings '{}' --steps 70 --storage int8,auto \
        --out benchmarks/results/decode_step_cpu_defaults.json

Writes results/decode_step_cpu.json. `--storage auto,int8` runs every case in both
storage formats, side by side (int8: records, bases and window in int8 with scales;
the saved run is results/decode_step_cpu_int8.json). `--kernels torch,compile` runs the
PyTorch path compiled by `torch.compile` beside it (inductor, dynamic shapes: the context
grows every step), as vLLM's CPU backend compiles its model.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the cache builder and op counter are test tooling
sys.path.insert(0, str(REPO / "benchmarks"))

from _cli import parse_choices, parse_settings  # noqa: E402
from _environment import environment  # noqa: E402
from attentionpack_vllm.config import AttentionPackConfig, AttentionPackConfigError  # noqa: E402
from attentionpack_vllm.decode import decode_and_fold, schedule_decode  # noqa: E402
from attentionpack_vllm.kernels.latent_decode_cpu import latent_decode_attention_cpu  # noqa: E402
from attentionpack_vllm.kernels.latent_decode_torch import latent_decode_attention  # noqa: E402
from op_counter import OpCounter  # noqa: E402
from scenario import build_scenario  # noqa: E402

HEADS, KV_HEADS, HEAD_SIZE = 9, 3, 64
SHAPES = ((1, 64), (1, 512), (10, 900), (16, 800))
SETTINGS = {"rank": 64, "window_size": 32}   # the settings of the committed runs before --settings
KERNELS = ("torch", "cpu", "compile")


def run_case(batch: int, context: int, partial: bool, storage: str = "auto", kernel: str = "torch",
             settings: dict | None = None, num_steps: int = 40) -> dict:
    config = AttentionPackConfig.from_dict({**(SETTINGS if settings is None else settings),
                                            "partial_rank_values": partial, "storage": storage})
    sc = build_scenario(config, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, prompt_lens=[context] * batch,
                        max_new_tokens=num_steps + 1, has_image=False)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, HEADS, HEAD_SIZE, generator=gen)
    k = torch.randn(batch, KV_HEADS * HEAD_SIZE, generator=gen)
    v = torch.randn(batch, KV_HEADS * HEAD_SIZE, generator=gen)
    compiled = kernel == "compile"
    if compiled:  # a fresh compiled function per case: its compilation (first step) is not timed by the median
        attention = torch.compile(latent_decode_attention, dynamic=True)
    else:
        attention = latent_decode_attention_cpu if kernel == "cpu" else latent_decode_attention
    steps, metadata, ops = [], [], None
    for step in range(num_steps):
        sc.seq_lens = [s + 1 for s in sc.seq_lens]
        start = time.perf_counter()
        decode, folds = schedule_decode(sc.tracker, sc.plan, sc.block_table, sc.slot_ids.tolist(),
                                        sc.seq_lens, sc.pages.shape[1], with_index=kernel != "cpu")
        metadata.append(time.perf_counter() - start)
        if step == 1 and not compiled:
            with OpCounter() as counter:
                decode_and_fold(q, k, v, sc.pages, sc.pool, sc.plan, decode, folds, HEAD_SIZE ** -0.5, attention)
            ops = {"working": counter.working, "host_reads": counter.host_reads}
            continue
        start = time.perf_counter()
        decode_and_fold(q, k, v, sc.pages, sc.pool, sc.plan, decode, folds, HEAD_SIZE ** -0.5, attention)
        if step >= 2 or not compiled:  # a compiled run's first steps compile
            steps.append(time.perf_counter() - start)
    keys = torch.randn(batch, KV_HEADS, context, HEAD_SIZE)
    values = torch.randn(batch, KV_HEADS, context, HEAD_SIZE)
    query = torch.randn(batch, HEADS, 1, HEAD_SIZE)
    dense = []
    for _ in range(num_steps):
        start = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(query, keys, values, enable_gqa=True)
        dense.append(time.perf_counter() - start)
    us = lambda xs: round(1e6 * xs, 1)  # noqa: E731
    row = {"batch": batch, "context": context, "partial_rank": partial, "storage": storage,
           "attention": {"torch": "eager", "cpu": "cpu kernel", "compile": "torch.compile"}[kernel],
           "attentionpack_median_us": us(statistics.median(steps)),
           "attentionpack_mean_us": us(statistics.fmean(steps)),
           "metadata_per_step_us": us(statistics.median(metadata)),
           "dense_sdpa_median_us": us(statistics.median(dense)),
           "plain_step_ops": ops}
    row["ratio_median_to_dense"] = round(row["attentionpack_median_us"] / row["dense_sdpa_median_us"], 2)
    print(f"[decode_step_cpu] batch {batch}, context {context}, partial rank {'on' if partial else 'off'}, "
          f"storage {storage}, {kernel}: "
          f"{row['attentionpack_median_us']:.0f} us median ({row['attentionpack_mean_us']:.0f} mean with the fold), "
          f"dense SDPA {row['dense_sdpa_median_us']:.0f} us, metadata {row['metadata_per_step_us']:.0f} us/step, "
          + (f"{ops['working']} ops, {ops['host_reads']} host reads" if ops else "ops not counted (compiled)"),
          flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--storage", default="auto",
                        help="comma-separated storage formats to run each case in (auto, int8)")
    parser.add_argument("--kernels", default="torch,cpu",
                        help=f"comma-separated latent attentions to run each case with ({', '.join(KERNELS)})")
    parser.add_argument("--settings", default=None,
                        help="AttentionPack settings as JSON (default: rank 64, window 32; '{}': the defaults)")
    parser.add_argument("--steps", type=int, default=40, help="decode steps per case (default 40)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "decode_step_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    storages = parse_choices(parser, "--storage", args.storage, ("auto", "int8"))
    kernels = parse_choices(parser, "--kernels", args.kernels, KERNELS)
    settings = SETTINGS if args.settings is None else parse_settings(parser, args.settings)
    try:
        config = AttentionPackConfig.from_dict(settings)
    except AttentionPackConfigError as exc:
        parser.error(f"--settings: {exc}")
    rows = [run_case(b, c, p, st, kernel, settings, args.steps)
            for b, c in SHAPES for p in (False, True) for st in storages for kernel in kernels]
    result = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "threads": args.threads, "storage": storages, "kernels": kernels, "geometry": {"heads": HEADS, "kv_heads": KV_HEADS,
                                                   "head_size": HEAD_SIZE, "rank": config.rank_text_key,
                                                   "window": config.window_size},
              "settings": settings, "steps": args.steps,
              "environment": environment(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"[decode_step_cpu] saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
