"""Capacity and memory: per-request KV bytes, dense against AttentionPack, and the crossover.

For LLaVA-1.5-7B's shapes (32 layers, 32 KV heads x 128, fp16; a sample is 576 image
tokens plus text) and Qwen2-VL-7B's (28 layers, 4 KV heads x 128), across ranks and
request lengths, from the project's own byte accounting (`MemoryReport`, which the
tests check against the tensors actually allocated). Both parts are reported: the
per-token records and the request's rows in the row pool (`row_pool`: each basis plane
only as many rows as the request has tokens of its modality, up to the plane's rank,
and the sink tokens and window as far as they are filled), in the model's dtype and with
int8 storage (`storage: int8`). A request is counted right after its prefill (its window
empty) and, as `..._decoding`, with a full window, the most it holds while decoding; the
paper sample is 576 image and 50 text tokens, the other lengths text only. The
`full_slot_bytes_per_request` column is what a slot of every plane at full rank with a
full window takes, the most any request holds. With `--check-vllm`, vLLM itself is started on random-weight
models of LLaVA-1.5-7B's and Qwen2-VL-7B's attention geometry (2 layers each) dense
and with AttentionPack, and the KV cache tokens it reports are set beside the
accounting.

    python benchmarks/capacity.py [--check-vllm]

Takes a second without vLLM, about 6 minutes with it. Results and the plot go to
benchmarks/results/capacity.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from _environment import environment
from attentionpack_vllm.config import AttentionPackConfig
from attentionpack_vllm.memory import MemoryReport
from attentionpack_vllm.plan import CompressionPlan
from attentionpack_vllm.row_pool import request_rows

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024

MODELS = {
    # name: (layers, kv heads, head size, tokens of one paper sample)
    "llava-1.5-7b": (32, 32, 128, 576 + 50),
    "qwen2-vl-7b": (28, 4, 128, 576 + 50),
}
SAMPLE_IMAGE_TOKENS = 576
# Attention geometry of each model for the vLLM check: (query heads, KV heads, head size),
# and the folder its random-weight stand-in is built in (the tests share LLaVA's).
GEOMETRY = {"llava-1.5-7b": ((32, 32, 128), "llava7b-geometry"),
            "qwen2-vl-7b": ((28, 4, 128), "qwen2vl7b-geometry")}
CHECK_LAYERS, CHECK_SEQS, CHECK_BLOCK = 2, 4, 32
RANKS = (16, 32, 64, 80, 128)
DEFAULT_RANK = AttentionPackConfig().rank_text_key
STORAGES = ("auto", "int8")  # the model's dtype; int8 with scales
# (rank, storage) started in vLLM; (80, "int8") is the defaults.
CHECK_SETTINGS = ((32, "auto"), (64, "auto"), (128, "auto"), (64, "int8"), (80, "int8"))
LENGTHS = (64, 128, 256, 626, 1024, 2048, 4096, 8192)


def per_request(model: str, rank: int, tokens: int, storage: str = "auto", image_tokens: int = 0) -> dict:
    """Bytes of one request of `tokens` (`image_tokens` of them image tokens) at `rank` and
    `storage` with every other setting at its default."""
    layers, kv_heads, head_size, _ = MODELS[model]
    config = AttentionPackConfig.from_dict({"rank": rank, "storage": storage})
    plan = CompressionPlan.build(config, kv_heads, head_size)
    report = MemoryReport.of(plan, torch.float16)

    def packed(n: int, exact: int) -> int:
        image = min(image_tokens, n)
        rows = request_rows(plan, n - image, image, exact)
        return n * report.record_bytes * layers + report.request_rows_bytes(rows, layers)

    dense = tokens * report.dense_token_bytes * layers
    after_prefill = packed(tokens, min(plan.sink_tokens, tokens))
    decoding = packed(tokens, min(plan.exact_rows, tokens))
    crossover = next((n for n in range(1, 1 << 16)
                      if packed(n, min(plan.exact_rows, n)) < n * report.dense_token_bytes * layers), None)
    return {"model": model, "rank": rank, "storage": storage, "tokens": tokens, "image_tokens": image_tokens,
            "dense_bytes": dense, "attentionpack_bytes": after_prefill, "attentionpack_bytes_decoding": decoding,
            "record_bytes_per_token_layer": report.record_bytes,
            "dense_bytes_per_token_layer": report.dense_token_bytes,
            "rows_bytes_per_request": after_prefill - tokens * report.record_bytes * layers,
            "rows_bytes_per_request_decoding": decoding - tokens * report.record_bytes * layers,
            "full_slot_bytes_per_request": report.slot_bytes * layers,
            "token_ratio": report.token_ratio, "reduction": dense / after_prefill,
            "reduction_decoding": dense / decoding, "crossover_tokens": crossover}


def check_vllm(model_dir: Path, kv_bytes: int, settings: tuple[tuple[int, str], ...]) -> list[dict]:
    """KV cache tokens vLLM reports, dense and with AttentionPack at each (rank, storage),
    same cache bytes."""
    worker = Path(__file__).resolve().parent.parent / "tests" / "llm_worker.py"
    rows = []
    for rank, storage in ((None, None), *settings):
        engine = dict(dtype="float16", enforce_eager=True, max_model_len=1024,
                      max_num_seqs=CHECK_SEQS, block_size=CHECK_BLOCK, kv_cache_memory_bytes=kv_bytes)
        if rank is not None:
            engine.update(attention_backend="attentionpack",
                          additional_config={"attentionpack": {"rank": rank, "storage": storage}})
        spec = {"model": str(model_dir), "engine": engine,
                "requests": [{"prompt": "Hello", "max_tokens": 2}]}
        spec_path = RESULTS / "_capacity_spec.json"
        spec_path.write_text(json.dumps(spec))
        print(f"[capacity] vLLM on {model_dir.name}, "
              f"{'dense' if rank is None else f'rank {rank}, storage {storage}'} ...", flush=True)
        proc = subprocess.run([sys.executable, str(worker), str(spec_path), str(RESULTS / "_out.json")],
                              capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        match = re.search(r"KV cache size: ([\d,]+) tokens", log)
        if proc.returncode or not match:
            raise SystemExit(f"vLLM run failed:\n{log[-3000:]}")
        rows.append({"rank": rank, "storage": storage, "kv_cache_tokens": int(match.group(1).replace(",", ""))})
        spec_path.unlink()
        (RESULTS / "_out.json").unlink(missing_ok=True)
    return rows


def vllm_check_model(model: str, geometry: tuple[int, int, int], folder: str, kv_bytes: int) -> dict:
    """vLLM's KV cache tokens at one model's attention geometry, beside the accounting."""
    from attentionpack_vllm.models import build_attention_geometry_model, default_models_dir

    num_heads, num_kv_heads, head_size = geometry
    model_dir = build_attention_geometry_model(
        default_models_dir() / folder, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_size=head_size, num_layers=CHECK_LAYERS)
    checks = check_vllm(model_dir, kv_bytes, CHECK_SETTINGS)
    dense_tokens = checks[0]["kv_cache_tokens"]
    for c in checks:
        # The dense row's figure does not depend on the plan; any plan gives it.
        config = AttentionPackConfig.from_dict({"rank": c["rank"] or 64, "storage": c["storage"] or "auto"})
        # The geometry model is a text-only Llama: its slots hold no image bases.
        plan = CompressionPlan.build(config, num_kv_heads, head_size, has_image=False)
        report = MemoryReport.of(plan, torch.float16)
        dense, packed = report.cache_tokens(kv_bytes, CHECK_LAYERS, CHECK_BLOCK, CHECK_SEQS)
        c["accounting_tokens"] = dense if c["rank"] is None else packed
        if c["rank"] is not None:
            c["ratio_to_dense"] = c["kv_cache_tokens"] / dense_tokens
            print(f"[capacity] vLLM at {model} geometry, rank {c['rank']} {c['storage']}: {c['kv_cache_tokens']} KV "
                  f"tokens (accounting {c['accounting_tokens']}), {c['ratio_to_dense']:.1f}x dense "
                  f"{dense_tokens}")
    return {"model": f"{model} attention geometry ({num_heads} query heads, {num_kv_heads} KV heads "
                     f"x {head_size}), {CHECK_LAYERS} layers, random weights", "rows": checks}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODELS), figsize=(12, 4.5))
    for ax, model in zip(axes, MODELS):
        dense = [r for r in rows if r["model"] == model and r["rank"] == RANKS[0] and r["storage"] == "auto"]
        ax.plot([r["tokens"] for r in dense], [r["dense_bytes"] / MIB for r in dense], "k-o", label="dense")
        for storage, style in zip(STORAGES, ("-o", "--s")):
            for i, rank in enumerate(RANKS):
                sel = [r for r in rows if r["model"] == model and r["rank"] == rank and r["storage"] == storage]
                ax.plot([r["tokens"] for r in sel], [r["attentionpack_bytes"] / MIB for r in sel], style,
                        color=f"C{i}", markersize=4,
                        label=f"rank {rank}" + (", int8 storage" if storage == "int8" else ""))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{model}: KV bytes per request (fp16, all layers)")
        ax.set_xlabel("tokens in the request")
        ax.set_ylabel("MiB")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-vllm", action="store_true",
                        help="also start vLLM on models of LLaVA's and Qwen2-VL's attention "
                             "geometry (about 6 minutes)")
    parser.add_argument("--kv-bytes", type=int, default=512 * MIB)
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)

    rows = [per_request(model, rank, tokens, storage) for model in MODELS for storage in STORAGES
            for rank in RANKS for tokens in LENGTHS]
    print(f"{'model':14} {'rank':>4} {'store':>5} {'tokens':>6} {'dense MiB':>10} {'AP MiB':>8} {'reduction':>9} "
          f"{'crossover':>9}")
    for r in rows:
        print(f"{r['model']:14} {r['rank']:>4} {r['storage']:>5} {r['tokens']:>6} {r['dense_bytes'] / MIB:>10.1f} "
              f"{r['attentionpack_bytes'] / MIB:>8.1f} {r['reduction']:>8.2f}x {r['crossover_tokens']:>9}")
    # The paper's rank (64) and the default rank, in both storages.
    samples = [per_request(model, rank, sample_tokens, storage, SAMPLE_IMAGE_TOKENS)
               for model, (_, _, _, sample_tokens) in MODELS.items() for rank in (64, DEFAULT_RANK)
               for storage in STORAGES]
    for s in samples:
        print(f"[capacity] {s['model']}, one paper sample ({s['tokens']} tokens), rank {s['rank']}, storage "
              f"{s['storage']}: dense {s['dense_bytes'] / 1e6:.1f} MB, AttentionPack "
              f"{s['attentionpack_bytes'] / 1e6:.1f} MB after prefill (rows {s['rows_bytes_per_request'] / 1e6:.1f} MB), "
              f"{s['reduction']:.2f}x; with a full window {s['attentionpack_bytes_decoding'] / 1e6:.1f} MB, "
              f"{s['reduction_decoding']:.2f}x")

    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "environment": environment(),
              "dtype": "float16", "window_size": AttentionPackConfig().window_size,
              "sink_tokens": AttentionPackConfig().sink_tokens,
              "rows": rows, "paper_samples": samples}
    if args.check_vllm:
        result["vllm_check"] = {"kv_cache_memory_bytes": args.kv_bytes, "max_num_seqs": CHECK_SEQS,
                                "layers": CHECK_LAYERS, "models": {}}
        for model, (geometry, folder) in GEOMETRY.items():
            result["vllm_check"]["models"][model] = vllm_check_model(model, geometry, folder,
                                                                     args.kv_bytes)
    (RESULTS / "capacity.json").write_text(json.dumps(result, indent=2))
    plot(rows, RESULTS / "capacity.png")
    print(f"[capacity] saved {RESULTS / 'capacity.json'} and capacity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
