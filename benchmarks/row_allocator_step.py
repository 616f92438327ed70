#!/usr/bin/env python
"""The metadata builder's row bookkeeping per decode step, on the host, at several batches.

Every step the builder fits each scheduled request's arena rows (`row_pool.RowAllocator`):
windows that folded give rows back, then each decode token takes a key and a value
window row. This times that bookkeeping alone for `--batches` requests decoding together
(SmolLM2-135M's attention geometry at the package defaults, 768-token prompts, windows
folding as they fill), as the builder calls it: one `fit_many` per direction for the whole
step; `--slot-by-slot` calls `fit` once per request instead, the way the builder worked
before `fit_many`. No vLLM, no device: a host cost that the step pays once, not per layer.

    .venv/bin/python benchmarks/row_allocator_step.py [--batches 24,256,1024] [--steps 200]

Writes results/row_allocator_step[_<tag>].json (median and mean microseconds per step).
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from _cli import save_json  # noqa: E402
from _environment import environment  # noqa: E402
from attentionpack_vllm.config import AttentionPackConfig  # noqa: E402
from attentionpack_vllm.plan import CompressionPlan  # noqa: E402
from attentionpack_vllm.row_pool import RowAllocator, full_request_rows  # noqa: E402
from attentionpack_vllm.windows import WindowTracker  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
PROMPT = 768


def time_steps(batch: int, steps: int, slot_by_slot: bool) -> dict:
    """Per-step seconds of the row bookkeeping for `batch` requests decoding `steps` tokens."""
    plan = CompressionPlan.build(AttentionPackConfig(), num_kv_heads=3, head_size=64, has_image=False)
    rows = RowAllocator.empty(plan, batch, 1 + batch * full_request_rows(plan))
    tracker = WindowTracker.for_plan(batch, plan)
    slots = np.arange(batch)
    text, image = np.full(batch, PROMPT), np.zeros(batch, dtype=np.int64)
    tracker.prefilled(slots, [PROMPT] * batch)
    for s in range(batch):  # the prompts' rows (not timed)
        rows.fit(s, PROMPT, 0, int(tracker.lengths[s]), grow=True)
    rows.take_fresh()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        held = tracker.lengths[slots].copy()
        text += 1
        if slot_by_slot:
            for s in range(batch):
                rows.fit(s, int(text[s]), 0, int(held[s]), grow=False)
            for s in range(batch):
                rows.fit(s, int(text[s]), 0, int(held[s]) + 1, grow=True)
        else:
            rows.fit_many(slots, text, image, held, grow=False)
            rows.fit_many(slots, text, image, held + 1, grow=True)
        rows.sync()
        rows.take_fresh()
        times.append(time.perf_counter() - start)
        tracker.advance(slots.tolist())
    return {"batch": batch, "steps": steps, "median_us": round(1e6 * statistics.median(times), 1),
            "mean_us": round(1e6 * statistics.fmean(times), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="24,256,1024", help="requests decoding together (comma-separated)")
    p.add_argument("--steps", type=int, default=200, help="decode steps timed per batch")
    p.add_argument("--slot-by-slot", action="store_true", help="one `fit` per request instead of `fit_many`")
    p.add_argument("--tag", default="", help="suffix of the results file")
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if min(batches) < 1 or args.steps < 1:
        p.error("--batches and --steps must be at least 1")
    rows = []
    for batch in batches:
        row = time_steps(batch, args.steps, args.slot_by_slot)
        print(f"[row_allocator_step] batch {batch}: {row['median_us']:.0f} us/step median, "
              f"{row['mean_us']:.0f} mean ({'slot by slot' if args.slot_by_slot else 'fit_many'})", flush=True)
        rows.append(row)
    result = {"command": shlex.join(["python", "benchmarks/row_allocator_step.py", *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "environment": environment(),
              "mode": "slot by slot" if args.slot_by_slot else "fit_many", "rows": rows}
    path = save_json(RESULTS, "row_allocator_step", args.tag, result)
    print(f"[row_allocator_step] saved {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
