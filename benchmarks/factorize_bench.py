#!/usr/bin/env python
"""Factorisation cost and accuracy: prefill compression and window folds, per method.

Times `factorize_batch` and `fold_batch` (attentionpack_vllm/factorize.py) for each
method ("exact" = torch.linalg.svd, "gram" = float64 Gram + eigh, "gram32" = the same
in float32, "randomized" = matrix products and Cholesky only) at LLaVA-1.5-7B's KV
width (32 KV heads x 128 = 4096), rank 64, with the captured energy relative to exact
SVD beside every time:

* compress: one modality's keys (or values) of 576 image tokens x 4096, one call
  of batch 1 / 16 / 64 (64 = every layer's K and V of one request at once).
* paper_sample: one LLaVA-1.5-7B request (576 image + 50 text tokens), K and V,
  32 layers, compressed either one call per layer and modality ("per_layer": 2 x 32
  calls of batch 2) or all layers in one call per modality ("all_layers": 2 calls
  of batch 64). GPU target: <= 10 ms.
* fold: one window fold of batch 1 / 16 / 64 requests, rank 64 + window 32 at width
  4096, 1,024 old tokens each; "per layer" = one call for keys + one for values.
  GPU target: <= 2 ms per layer at batch 64.

compress and fold also run at SmolLM2-135M's KV width (3 x 64 = 192), the model this
project serves on CPU.

Accuracy: captured energy 1 - ||X - F B||^2 / ||X||^2 at rank 64 over exact SVD's (the
smallest ratio in the batch; for the paper sample, over the first two matrices of
each call), and the same for the first 16 columns (what a partial-rank group reads).
For a fold the data is [old reconstruction; window] and the reference is the exact
fold. The data is synthetic, seeded: rows with a power-law spectrum (singular values
~ 1 / (1 + i)) over 512 latent directions plus 2 % noise; old tokens of a fold are a
rank-64 factorisation, the window mixes their directions with new ones.

Torch only: factorize.py is loaded from the checkout by path; vLLM is never imported.

    python benchmarks/factorize_bench.py                      # full grid (GPU: under a minute)
    python benchmarks/factorize_bench.py --quick --threads 1  # CPU-sized, about 3 minutes here
    python benchmarks/factorize_bench.py --smoke              # tiny shapes: checks the script
    python benchmarks/factorize_bench.py --replot results/factorize_bench_<device>.json   # redraw its plot

--quick: compress at batch 1 and 4 (exact at batch 1 only), the paper sample's first 2
layers, folds as in the full grid, 5 repetitions (2 for the paper sample). --threads 1
gives steady timings on a CPU that other jobs share.

The cases run in the order paper_sample, fold, compress; on a GPU no new configuration
starts after 45 s (`--max-seconds`; benchmarks/gpu_check.sh gives the step 60 s).
Saves results/factorize_bench_<device>.json ("cpu" or the card's name; the JSON holds
the command, date, device, mode and sizes) after every configuration, and a PNG when
matplotlib is installed.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"
METHODS = ("exact", "gram", "gram32", "randomized")
RANK, PREFIX_COLUMNS = 64, 16
TARGET_PAPER_MS, TARGET_FOLD_MS = 10.0, 2.0


def load_factorize():
    """attentionpack_vllm/factorize.py as a stand-alone module (it imports only torch)."""
    path = REPO / "attentionpack_vllm" / "factorize.py"
    spec = importlib.util.spec_from_file_location("attentionpack_factorize", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fz = load_factorize()


def sizes(args) -> dict:
    """The grid: LLaVA-1.5-7B's shapes, reduced by --quick (CPU) or --smoke (tiny)."""
    if args.smoke:
        return dict(width=128, widths=[128, 48], image=64, text=12, layers=2, rank=16, prefix=4, window=8,
                    old=32, compress_batches=[1, 2], fold_batches=[1, 2], exact_compress_max_batch=2,
                    reps=1)
    grid = dict(width=4096, widths=[4096, 192], image=576, text=50, layers=32, rank=RANK,
                prefix=PREFIX_COLUMNS, window=32, old=1024, compress_batches=[1, 16, 64],
                fold_batches=[1, 16, 64], exact_compress_max_batch=64, reps=5)
    if args.quick:
        grid.update(layers=2, compress_batches=[1, 4], exact_compress_max_batch=1, reps=5)
    return grid


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

def kv_like(batch: int, tokens: int, width: int, gen: torch.Generator, device) -> torch.Tensor:
    """[batch, tokens, width]: power-law spectrum over 512 latent directions plus 2 % noise."""
    latent = min(512, tokens, width)
    scales = 1.0 / (1.0 + torch.arange(latent, dtype=torch.float32))
    coeffs = torch.randn(batch, tokens, latent, generator=gen) * scales
    directions = torch.randn(batch, latent, width, generator=gen) / width ** 0.5
    rows = coeffs @ directions
    rows += 0.02 * rows.std() * torch.randn(batch, tokens, width, generator=gen)
    return rows.to(device)


def fold_inputs(batch: int, width: int, grid: dict, gen: torch.Generator, device):
    """Old factors [B, old, rank] of a rank-`rank` segment, its basis [B, rank, width],
    and a window [B, window, width] half in the old directions, half new."""
    rank, window, old = grid["rank"], grid["window"], grid["old"]
    scales = 1.0 / (1.0 + torch.arange(rank, dtype=torch.float32))
    basis = torch.linalg.qr(torch.randn(batch, width, rank, generator=gen))[0].mT
    factors = torch.randn(batch, old, rank, generator=gen) * scales * width ** 0.5
    inside = (torch.randn(batch, window, rank, generator=gen) * scales * width ** 0.5) @ basis
    new = inside + 0.5 * width ** 0.5 * kv_like(batch, window, width, gen, "cpu")
    return factors.to(device), basis.to(device), new.to(device)


# ---------------------------------------------------------------------------
# Timing and accuracy
# ---------------------------------------------------------------------------

def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, device, reps: int) -> dict:
    """{name: {ms_median, ms_min, reps}} of each fn() (wall time, synchronised on a GPU).

    One warm-up call each, then `reps` rounds in which every fn runs once in turn, so
    that other work on a shared machine slows all of them alike."""
    for fn in fns.values():
        fn()
    synchronize(device)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: {"ms_median": statistics.median(t), "ms_min": min(t), "reps": reps} for name, t in times.items()}


def energy_ratio(x: torch.Tensor, low, reference, columns: int | None = None) -> float:
    """Smallest captured-energy ratio (method / reference) over the batch."""
    ours = fz.captured_energy(x, low, columns)
    ref = fz.captured_energy(x, reference, columns)
    return float((ours / ref.clamp_min(1e-300)).min())


def folded_lowrank(old_factors, fold, new_rows_count):
    return fz.LowRank(torch.cat([old_factors @ fold.rotation, fold.new_factors[:, :new_rows_count]], dim=1),
                      fold.basis)


def first(low, count: int):
    return fz.LowRank(low.factors[:count], low.basis[:count])


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------

def bench_compress(grid, methods, device, say):
    """Yields the rows of one configuration (width, batch) at a time."""
    gen = torch.Generator().manual_seed(0)
    for width, batch in ((w, b) for w in grid["widths"] for b in grid["compress_batches"]):
        rows = []
        x = kv_like(batch, grid["image"], width, gen, device)
        base = dict(case="compress", batch=batch, tokens=grid["image"], width=width, rank=grid["rank"])
        timed = [m for m in methods if m != "exact" or batch <= grid["exact_compress_max_batch"]]
        for method in sorted(set(methods) - set(timed)):
            rows.append(dict(base, method=method, skipped="exact SVD at this batch takes too long here"))
            say(f"compress  width {width:>4} batch {batch:>3}  {method:<10}  skipped")
        runs = {m: (lambda s=fz.SvdSettings(m): fz.factorize_batch(x, grid["rank"], s)) for m in timed}
        times = time_interleaved(runs, device, grid["reps"])
        n_ref = min(batch, 2)
        reference = fz.factorize_batch(x[:n_ref], grid["rank"], fz.SvdSettings("exact"))
        for method in timed:
            low = first(runs[method](), n_ref)
            row = dict(base, method=method, **times[method],
                       energy_ratio=energy_ratio(x[:n_ref], low, reference),
                       energy_ratio_first16=energy_ratio(x[:n_ref], low, reference, grid["prefix"]),
                       accuracy_over=f"{n_ref} of {batch} matrices")
            rows.append(row)
            say(f"compress  width {width:>4} batch {batch:>3}  {method:<10} {row['ms_median']:>10.2f} ms "
                f"(min {row['ms_min']:.2f})   energy vs exact {row['energy_ratio']:.5f} "
                f"(first {grid['prefix']} columns {row['energy_ratio_first16']:.5f})")
        yield rows


def bench_paper_sample(grid, methods, device, say):
    """Yields its rows once (one configuration)."""
    rows = []
    gen = torch.Generator().manual_seed(1)
    layers, rank = grid["layers"], grid["rank"]
    image = kv_like(2 * layers, grid["image"], grid["width"], gen, device)   # [K, V] per layer
    text = kv_like(2 * layers, grid["text"], grid["width"], gen, device)
    reference = {"image": fz.factorize_batch(image[:2], rank, fz.SvdSettings("exact")),
                 "text": fz.factorize_batch(text[:2], rank, fz.SvdSettings("exact"))}

    def per_layer(settings):
        for layer in range(layers):
            fz.factorize_batch(image[2 * layer:2 * layer + 2], rank, settings)
            fz.factorize_batch(text[2 * layer:2 * layer + 2], rank, settings)

    def all_layers(settings):
        return fz.factorize_batch(image, rank, settings), fz.factorize_batch(text, rank, settings)

    runs = {(m, schedule): (lambda s=fz.SvdSettings(m), f=f: f(s))
            for m in methods for schedule, f in (("per_layer", per_layer), ("all_layers", all_layers))}
    times = time_interleaved(runs, device, max(1, grid["reps"] // 2))
    for (method, schedule), run in runs.items():
        row = dict(case="paper_sample", method=method, schedule=schedule, layers=layers,
                   image_tokens=grid["image"], text_tokens=grid["text"], width=grid["width"], rank=rank,
                   calls=(2 * layers if schedule == "per_layer" else 2), **times[(method, schedule)])
        row["ms_per_layer"] = row["ms_median"] / layers
        if layers != 32:
            row["ms_32_layers_scaled"] = row["ms_per_layer"] * 32
        acc = ""
        if schedule == "all_layers":
            for name, x, low in zip(("image", "text"), (image, text), run()):
                row[f"energy_ratio_{name}"] = energy_ratio(x[:2], first(low, 2), reference[name])
            row["accuracy_over"] = "the first 2 matrices (layer 0's K and V) of each modality"
            acc = f"   energy vs exact image {row['energy_ratio_image']:.5f}, text {row['energy_ratio_text']:.5f}"
        rows.append(row)
        say(f"paper     {schedule:<10}  {method:<10} {row['ms_median']:>10.2f} ms for {layers} layers "
            f"({row['ms_per_layer']:.2f} ms per layer){acc}")
    yield rows


def bench_fold(grid, methods, device, say):
    """Yields the rows of one configuration (width, batch) at a time."""
    gen = torch.Generator().manual_seed(2)
    for width, batch in ((w, b) for w in grid["widths"] for b in grid["fold_batches"]):
        rows = []
        factors, basis, new = fold_inputs(batch, width, grid, gen, device)
        data = torch.cat([factors @ basis, new], dim=1)
        runs = {m: (lambda s=fz.SvdSettings(m): fz.fold_batch(factors, basis, new, grid["rank"], s))
                for m in methods}
        times = time_interleaved(runs, device, grid["reps"])
        reference = folded_lowrank(factors, fz.fold_batch(factors, basis, new, grid["rank"],
                                                          fz.SvdSettings("exact")), new.shape[1])
        for method in methods:
            low = folded_lowrank(factors, runs[method](), new.shape[1])
            row = dict(case="fold", method=method, batch=batch, old_tokens=grid["old"], window=grid["window"],
                       width=width, rank=grid["rank"], **times[method],
                       energy_ratio=energy_ratio(data, low, reference),
                       energy_ratio_first16=energy_ratio(data, low, reference, grid["prefix"]))
            row["ms_per_layer_k_and_v"] = 2 * row["ms_median"]
            rows.append(row)
            say(f"fold      width {width:>4} batch {batch:>3}  {method:<10} {row['ms_median']:>10.2f} ms "
                f"(min {row['ms_min']:.2f}; {row['ms_per_layer_k_and_v']:.2f} ms per layer, K and V)   "
                f"energy vs exact fold {row['energy_ratio']:.5f} "
                f"(first {grid['prefix']} columns {row['energy_ratio_first16']:.5f})")
        yield rows


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def device_slug(device) -> str:
    if torch.device(device).type != "cuda":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_") or "gpu"


def targets(rows: list[dict], device) -> dict:
    """The GPU targets, checked against this run's "auto" method times (on CUDA only)."""
    fast = fz.resolve_method("auto", device)
    if torch.device(device).type != "cuda":
        return {"auto_method_here": fast, "note": "the targets are GPU targets; not checked on CPU"}
    paper = [r for r in rows if r["case"] == "paper_sample" and r["method"] == fast and "ms_median" in r]
    fold64 = [r for r in rows if r["case"] == "fold" and r["method"] == fast and r["batch"] == 64
              and r["width"] == 4096]
    out = {"auto_method_here": fast}
    if paper:
        best = min(paper, key=lambda r: r["ms_median"])
        out["paper_sample_ms"] = best.get("ms_32_layers_scaled", best["ms_median"])
        out["paper_sample_schedule"] = best["schedule"]
        out["paper_sample_target_ms"] = TARGET_PAPER_MS
        out["paper_sample_met"] = out["paper_sample_ms"] <= TARGET_PAPER_MS
    if fold64:
        out["fold64_ms_per_layer"] = fold64[0]["ms_per_layer_k_and_v"]
        out["fold64_target_ms_per_layer"] = TARGET_FOLD_MS
        out["fold64_met"] = out["fold64_ms_per_layer"] <= TARGET_FOLD_MS
    return out


def fastest(rows: list[dict]) -> list[dict]:
    """Per compress / fold configuration: the fastest method, and the fastest of exact accuracy
    (captured energy within 1e-5 of exact SVD's), by the minimum time (the least disturbed
    by other work on a shared machine)."""
    out = []
    for case in ("compress", "fold"):
        timed = [r for r in rows if r["case"] == case and "ms_median" in r]
        for width, batch in sorted({(r["width"], r["batch"]) for r in timed}):
            same = [r for r in timed if (r["width"], r["batch"]) == (width, batch)]
            exact_accuracy = [r for r in same if r["energy_ratio"] >= 1 - 1e-5]
            best = min(same, key=lambda r: r["ms_min"])
            entry = dict(case=case, width=width, batch=batch, fastest=best["method"])
            if exact_accuracy:
                entry["fastest_exact_accuracy"] = min(exact_accuracy, key=lambda r: r["ms_min"])["method"]
            out.append(entry)
    return out


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in result["rows"] if "ms_median" in r]
    label = {"compress": lambda r: f"w{r['width']}\nb{r['batch']}",
             "fold": lambda r: f"w{r['width']}\nb{r['batch']}",
             "paper_sample": lambda r: r["schedule"]}
    size = result["sizes"]
    titles = {"compress": f"compress ({size['image']} tokens, rank {size['rank']}): width / batch",
              "fold": f"fold (rank {size['rank']} + window {size['window']}): width / batch",
              "paper_sample": f"paper sample ({size['image']} + {size['text']} tokens, K and V, "
                              f"{size['layers']} layers)"}
    colors = {"exact": "tab:red", "gram": "tab:blue", "gram32": "tab:cyan", "randomized": "tab:green"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, case in zip(axes, titles):
        sub = [r for r in rows if r["case"] == case]
        labels = list(dict.fromkeys(label[case](r) for r in sub))
        width = 0.8 / len(METHODS)
        for i, method in enumerate(METHODS):
            points = [(labels.index(label[case](r)) + i * width, r) for r in sub if r["method"] == method]
            ax.bar([x for x, _ in points], [r["ms_median"] for _, r in points], width, label=method,
                   color=colors[method])
            for x, r in points:
                ratio = r.get("energy_ratio", r.get("energy_ratio_image"))
                if ratio is not None:
                    ax.text(x, r["ms_median"], f"{ratio:.5f}", ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks([j + width for j in range(len(labels))], labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms per call (median)")
        ax.set_title(titles[case], fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"factorize_bench on {result['device']} (bar labels: captured energy over exact SVD's)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized grid (see the module docstring)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--cases", nargs="+", choices=("paper_sample", "fold", "compress"),
                   default=["paper_sample", "fold", "compress"])
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no new configuration after this many seconds (default: 45 on a GPU, "
                        "none on CPU); what ran is saved")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON and PNG")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 gives steady timings on a CPU that other jobs share)")
    p.add_argument("--replot", type=Path, metavar="JSON", help="only redraw the plot of a saved run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        png = args.replot.with_suffix(".png")
        print(f"saved {png}" if plot(json.loads(args.replot.read_text()), png) else "matplotlib is not installed")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    grid = sizes(args)
    started = time.time()

    def say(line: str) -> None:
        print(f"[{time.time() - started:7.1f} s] {line}", flush=True)

    suffix = "_smoke" if args.smoke else ""   # a --quick run says so in its JSON ("mode", "sizes")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"factorize_bench_{device_slug(device)}{suffix}"
    result = dict(
        command=shlex.join(getattr(sys, "orig_argv", [sys.executable] + sys.argv)),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device_name(device), torch=torch.__version__, cuda=torch.version.cuda,
        python=platform.python_version(), torch_threads=torch.get_num_threads(),
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        mode="smoke" if args.smoke else "quick" if args.quick else "full", sizes=grid,
        settings=dict(oversample=fz.SvdSettings().oversample, power_iters=fz.SvdSettings().power_iters,
                      eigen_steps_factorize=fz.EIGEN_STEPS_FACTORIZE, eigen_steps_fold=fz.EIGEN_STEPS_FOLD),
        auto=fz.describe(fz.SvdSettings(), device),
        auto_method=fz.resolve_method("auto", device),
        note=("times: wall clock per call(s), median over reps, synchronised on a GPU; energy_ratio: "
              "captured energy at the rank over exact SVD's (smallest in the batch); synthetic data "
              "(power-law spectrum, 2 % noise)"),
        rows=[])
    say(f"device {result['device']}; torch {torch.__version__}; mode {result['mode']}; auto: {result['auto']}")
    cases = {"compress": bench_compress, "paper_sample": bench_paper_sample, "fold": bench_fold}
    json_path = args.out / f"{stem}.json"
    budget = args.max_seconds
    if budget is None and device.type == "cuda":
        budget = 45.0      # benchmarks/gpu_check.sh gives this step 60 s
    result["max_seconds"] = budget

    def save() -> None:
        result["targets"] = targets(result["rows"], device)
        result["fastest"] = fastest(result["rows"])
        result["vllm_imported"] = "vllm" in sys.modules
        result["package_imported"] = "attentionpack_vllm" in sys.modules
        json_path.write_text(json.dumps(result, indent=1) + "\n")

    with torch.inference_mode():
        for case in args.cases:
            for rows in cases[case](grid, args.methods, device, say):
                result["rows"] += rows
                save()
                if budget and time.time() - started > budget:
                    break
            if budget and time.time() - started > budget:
                result["stopped"] = f"time budget of {budget:.0f} s reached after the {case} rows above"
                say(result["stopped"])
                save()
                break
    say(f"targets: {result['targets']}")
    say(f"saved {json_path}")
    png = args.out / f"{stem}.png"
    if plot(result, png):
        say(f"saved {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
