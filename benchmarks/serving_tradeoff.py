#!/usr/bin/env python
"""The text mix's two targets against each other: requests/s and time per output token.

Reads the saved text-mix runs of `serving_throughput.py` at the mix's request shape
(24 requests of 768 + 128 tokens, 192 MiB of KV cache) and today's defaults (rank 80,
int8 storage, a 64-token window; `RUNS`: earlier files ran other defaults) and sets
AttentionPack's ratio to dense in requests/s against its ratio in mean time per output
token, one point per run, labelled with its `max_num_seqs` and commit, beside the
targets (>= 1.3x requests/s, <= 1.2x time per output token).

The two ratios are tied: averaged over a run, the requests decoding at once are the
requests/s times each request's decoding time (Little's law), and a request's time per
output token is that decoding time over its tokens. So

    ratio of the time per output token = ratio of the requests decoding at once
                                         / ratio of the requests/s,

and the product of the two ratios is the ratio of the requests decoding at once, which
the JSON lists per run (`decoding_at_once_ratio`, against each run's peak running ratio).

    python benchmarks/serving_tradeoff.py

Writes benchmarks/results/serving_tradeoff.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# The runs at today's defaults (serving_text.json has `{}` too, but then meant rank 64, 16-bit).
RUNS = ("serving_text_seqs8.json", "serving_text_seqs8_fit_many.json", "serving_text_defaults.json",
        "serving_text_seqs24.json", "serving_text_seqs24_rows.json", "serving_text_seqs24_fit_many.json")
SHAPE = {"mix": "text", "num_prompts": 24, "input_len": 768, "output_len": 128,
         "kv_cache_memory_bytes": 192 * 2**20, "attentionpack_settings": {}}
TARGETS = {"request_throughput": 1.3, "mean_tpot_ms": 1.2}


def points(results: Path) -> list[dict]:
    """One point per run of `RUNS` present, sorted by max_num_seqs."""
    out = []
    for path in (results / name for name in RUNS):
        if not path.exists():
            continue
        run = json.loads(path.read_text())
        differs = [key for key, value in SHAPE.items() if run.get(key) != value]
        if differs:
            raise SystemExit(f"{path.name}: not the text mix's shape ({', '.join(differs)} differ)")
        ratios = run["ratios_attentionpack_over_dense"]
        peak = {b: run["backends"][b]["median"]["peak_running_requests"] for b in ("dense", "attentionpack")}
        out.append({"file": path.name, "max_num_seqs": run["max_num_seqs"],
                    "commit": (run["environment"].get("commit") or "")[:7],
                    "requests_per_second_ratio": round(ratios["request_throughput"], 3),
                    "time_per_output_token_ratio": round(ratios["mean_tpot_ms"], 3),
                    "decoding_at_once_ratio": round(ratios["request_throughput"] * ratios["mean_tpot_ms"], 2),
                    "peak_running_ratio": round(peak["attentionpack"] / peak["dense"], 2)})
    return sorted(out, key=lambda p: (p["max_num_seqs"], p["commit"]))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    x_max = max(r["time_per_output_token_ratio"] for r in rows) * 1.35
    y_max = max(TARGETS["request_throughput"], *(r["requests_per_second_ratio"] for r in rows)) * 1.08
    tpot, rps = TARGETS["mean_tpot_ms"], TARGETS["request_throughput"]
    ax.fill_between([0.9, tpot], rps, y_max, color="tab:green", alpha=0.15, lw=0)
    ax.text(0.92, y_max * 0.99, "both targets", va="top", fontsize=8, color="tab:green")
    # Little's law: requests/s ratio = decoding-at-once ratio / time-per-output-token ratio.
    corner = tpot * rps
    xs = [0.9 + i * (x_max - 0.9) / 200 for i in range(201)]
    ax.plot(xs, [corner / x for x in xs], ":", color="0.5", lw=1)
    ax.text(2.0, corner / 2.0 * 0.97, f"{corner:.2f}x dense's requests decoding at once", va="top",
            fontsize=8, color="0.4")
    colours = dict(zip(sorted({r["max_num_seqs"] for r in rows}), ("tab:blue", "tab:orange", "tab:red", "tab:purple")))
    for seqs, colour in colours.items():
        mine = [r for r in rows if r["max_num_seqs"] == seqs]
        ax.plot([r["time_per_output_token_ratio"] for r in mine], [r["requests_per_second_ratio"] for r in mine],
                "o", color=colour, label=f"max_num_seqs {seqs}")
    for r in rows:  # each run's commit beside its point
        ax.annotate(r["commit"], (r["time_per_output_token_ratio"], r["requests_per_second_ratio"]),
                    textcoords="offset points", xytext=(5, 2), fontsize=7, color="0.3")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0.9, x_max)
    ax.set_ylim(0.5, y_max)
    ax.set_xlabel("time per output token, AttentionPack / dense")
    ax.set_ylabel("requests/s, AttentionPack / dense")
    ax.set_title("SmolLM2-135M, text mix, this CPU: the two targets", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args(argv)
    rows = points(RESULTS)
    if not rows:
        raise SystemExit(f"no text-mix serving results at the default shape under {RESULTS}")
    for r in rows:
        print(f"[serving_tradeoff] max_num_seqs {r['max_num_seqs']} ({r['commit']}): "
              f"{r['requests_per_second_ratio']:.2f}x requests/s, {r['time_per_output_token_ratio']:.2f}x time per "
              f"output token, {r['decoding_at_once_ratio']:.2f}x decoding at once "
              f"(peak running {r['peak_running_ratio']:.2f}x)")
    result = {"command": shlex.join(["python", "benchmarks/serving_tradeoff.py", *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "targets": TARGETS, "shape": SHAPE, "runs": rows}
    (RESULTS / "serving_tradeoff.json").write_text(json.dumps(result, indent=2))
    plot(rows, RESULTS / "serving_tradeoff.png")
    print("[serving_tradeoff] saved benchmarks/results/serving_tradeoff.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
