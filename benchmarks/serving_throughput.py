"""Serving throughput on this CPU: vLLM's own backend against AttentionPack, side by side.

Same model, same KV cache bytes, same request mix, in a regime where the dense cache
is the limit. For each backend a `vllm serve` is started on 127.0.0.1 and vLLM's own
`vllm bench serve` is run against it `--reps` times (all requests at once); the
engine's running-request count is read from /metrics while it runs. Reported per
backend: requests/s, output tokens/s, mean time per output token and to first token,
the most requests the engine ran at once, and the KV cache tokens it reported; then
the AttentionPack/dense ratios of the medians. The image mixes start both servers
with `--limit-mm-per-prompt` one image, what their requests send.

    python benchmarks/serving_throughput.py --mix text    # SmolLM2-135M-Instruct, text
    python benchmarks/serving_throughput.py --mix image   # tiny LLaVA, image + text
    python benchmarks/serving_throughput.py --mix image-135m  # the same, a 135M-shaped Llama inside

Each mix takes about 10-20 minutes here (two server starts, three repetitions each).
Results: benchmarks/results/serving_<mix>.{json,png} (`--tag` adds a suffix).

On a GPU machine with vLLM (CUDA) and this package installed, the paper's setting is
LLaVA-1.5-7B with 336x336 images, in float16:

    python benchmarks/serving_throughput.py --mix image --model llava-hf/llava-1.5-7b-hf \
        --dtype float16 --image-size 336 --max-model-len 1024 --kv-bytes 4294967296 \
        --max-num-seqs 64 --num-prompts 256 --input-len 64 --output-len 128 --tag llava7b
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from _cli import parse_settings, save_json, tagged
from _environment import environment
from attentionpack_vllm import models
from attentionpack_vllm.local_server import vllm_server

RESULTS = Path(__file__).resolve().parent / "results"
ONE_IMAGE = '{"image": 1, "video": 0}'
IMAGE_BENCH_ARGS = ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
                    "--dataset-name", "random-mm", "--random-mm-base-items-per-request", "1",
                    "--random-mm-num-mm-items-range-ratio", "1.0",
                    "--random-mm-limit-mm-per-prompt", ONE_IMAGE]
# Both servers accept what the image requests send, one image each; AttentionPack then
# sizes its image bases to one image's tokens (16) instead of the rank (80).
IMAGE_SERVE_ARGS = ["--limit-mm-per-prompt", ONE_IMAGE]
MIXES = {
    # mix: (model builder, folder, bench dataset arguments, serve arguments of both backends)
    "text": (models.convert_smollm2, "smollm2-135m-instruct",
             ["--backend", "openai", "--endpoint", "/v1/completions", "--dataset-name", "random"], []),
    "image": (models.build_tiny_llava, "tiny-llava", IMAGE_BENCH_ARGS, IMAGE_SERVE_ARGS),
    # The same images around a language model of SmolLM2-135M's shape (random weights),
    # where the model's compute, not vLLM's per-token work, sets a step's cost.
    "image-135m": (models.build_llava_135m, "llava-135m", IMAGE_BENCH_ARGS, IMAGE_SERVE_ARGS),
}
DEFAULT_IMAGE_SIZE = models.LLAVA_IMAGE_SIZE  # the tiny LLaVA's input size
# Per mix, a regime where the dense cache is the limit: a few dense requests' worth of
# KV bytes, more requests than fit, and max_num_seqs at the number of requests, so that
# only the KV cache limits either backend. The tiny LLaVA's KV width is 64, so it is
# compressed at rank 16 (the default would store it at full width).
MIX_DEFAULTS = {
    "text": dict(num_prompts=24, input_len=768, output_len=128, max_num_seqs=24,
                 kv_bytes=192 * 2**20, settings="{}"),
    "image": dict(num_prompts=48, input_len=256, output_len=128, max_num_seqs=48,
                  kv_bytes=8 * 2**20, settings='{"rank": 16}'),
    "image-135m": dict(num_prompts=48, input_len=256, output_len=128, max_num_seqs=48,
                       kv_bytes=96 * 2**20, settings="{}"),
}
METRICS = ("request_throughput", "output_throughput", "mean_tpot_ms", "mean_ttft_ms")


def poll_running(url: str, stop: threading.Event, peak: list[float]) -> None:
    """Highest vllm:num_requests_running seen on /metrics until `stop`."""
    pattern = re.compile(r"^vllm:num_requests_running\{[^}]*\} ([\d.]+)", re.M)
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url + "/metrics", timeout=2) as r:
                for value in pattern.findall(r.read().decode()):
                    peak[0] = max(peak[0], float(value))
        except OSError:
            pass
        stop.wait(0.5)


def bench_once(url: str, args, mix_args: list[str], out: Path) -> dict:
    vllm_cli = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm_cli), "bench", "serve", "--base-url", url, "--model", "bench-model",
           "--tokenizer", str(args.model_dir), *mix_args,
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--num-prompts", str(args.num_prompts), "--ignore-eos", "--seed", "0",
           "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    stop, peak = threading.Event(), [0.0]
    poller = threading.Thread(target=poll_running, args=(url, stop, peak), daemon=True)
    poller.start()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    stop.set()
    poller.join()
    if proc.returncode:
        raise SystemExit(f"vllm bench serve failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(out.read_text())
    out.unlink()
    row = {k: data[k] for k in METRICS}
    row["completed"] = data["completed"]
    row["peak_running_requests"] = peak[0]
    return row


def run_backend(name: str, args, mix_args: list[str], mix_serve_args: list[str]) -> dict:
    serve_args = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
                  "--max-num-seqs", str(args.max_num_seqs), "--kv-cache-memory-bytes", str(args.kv_bytes),
                  "--enforce-eager", "--seed", "0", "--block-size", "32", *mix_serve_args]
    if name == "attentionpack":
        serve_args += ["--attention-backend", "attentionpack", "--additional-config",
                       json.dumps({"attentionpack": args.settings})]
    else:
        serve_args += ["--no-enable-prefix-caching"]  # same as AttentionPack, which turns it off
    log = RESULTS / f"_serve_{name}.log"
    print(f"[serving] starting vllm serve ({name}) ...", flush=True)
    with vllm_server(args.model_dir, serve_args, log, served_name="bench-model") as (url, _):
        kv_tokens = int(re.search(r"KV cache size: ([\d,]+) tokens", log.read_text()).group(1).replace(",", ""))
        reps = []
        for rep in range(args.reps):
            row = bench_once(url, args, mix_args, RESULTS / f"_bench_{name}_{rep}.json")
            print(f"[serving] {name} rep {rep + 1}/{args.reps}: {row['request_throughput']:.2f} req/s, "
                  f"{row['output_throughput']:.1f} out tok/s, TPOT {row['mean_tpot_ms']:.1f} ms, "
                  f"peak running {row['peak_running_requests']:.0f}", flush=True)
            reps.append(row)
    log.unlink()
    median = {k: statistics.median(r[k] for r in reps) for k in (*METRICS, "peak_running_requests")}
    return {"kv_cache_tokens": kv_tokens, "repetitions": reps, "median": median}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["requests/s", "output tok/s", "TPOT (ms)", "peak running"]
    keys = ["request_throughput", "output_throughput", "mean_tpot_ms", "peak_running_requests"]
    fig, axes = plt.subplots(1, len(keys), figsize=(13, 3.5))
    for ax, key, label in zip(axes, keys, labels):
        values = [result["backends"][b]["median"][key] for b in ("dense", "attentionpack")]
        ax.bar(["vLLM's own backend", "AttentionPack"], values, color=["0.5", "tab:blue"])
        ax.set_title(label)
    fig.suptitle(f"{result['mix']} mix, {result['model']}: medians of {result['reps']} runs, "
                 f"same {result['kv_cache_memory_bytes'] // 2**20} MiB KV cache")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def mix_help(key: str) -> str:
    return "default " + ", ".join(f"{mix} {d[key]}" for mix, d in MIX_DEFAULTS.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mix", choices=sorted(MIXES), default="text")
    p.add_argument("--num-prompts", type=int, default=None, help=mix_help("num_prompts"))
    p.add_argument("--input-len", type=int, default=None, help=mix_help("input_len"))
    p.add_argument("--output-len", type=int, default=None, help=mix_help("output_len"))
    p.add_argument("--kv-bytes", type=int, default=None,
                   help="KV cache bytes for both backends; " + mix_help("kv_bytes"))
    # The same value for both backends. AttentionPack preallocates one slot (bases +
    # window) per sequence from the KV bytes; past `max_pool_fraction` of them it runs
    # fewer sequences than asked, and its server log says so.
    p.add_argument("--max-num-seqs", type=int, default=None, help=mix_help("max_num_seqs"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--settings", default=None,
                   help="AttentionPack settings (JSON); " + mix_help("settings")
                        + " (with --model: {})")
    p.add_argument("--model", default=None,
                   help="model folder or Hugging Face id (default: the mix's offline test model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                   help=f"side of the square random images of the image mix (default {DEFAULT_IMAGE_SIZE})")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the engine's context limit (default: input + output + 64 tokens; "
                        "an image mix on a real VLM needs room for its image tokens too)")
    p.add_argument("--tag", default="", help="suffix of the results files (serving_<mix>[_<tag>])")
    args = p.parse_args(argv)
    if args.model and args.settings is None:
        args.settings = "{}"  # rank 16 suits the tiny test model only; a real model gets the defaults
    for key, value in MIX_DEFAULTS[args.mix].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.max_model_len is None:
        args.max_model_len = args.input_len + args.output_len + 64
    if args.image_size < 1:
        p.error(f"--image-size must be a positive number of pixels, got {args.image_size}")
    args.settings = parse_settings(p, args.settings)
    builder, folder, mix_args, mix_serve_args = MIXES[args.mix]
    if "random-mm" in mix_args:  # the image dataset draws its image sizes from a bucket table
        mix_args = [*mix_args, "--random-mm-bucket-config",
                    f"{{({args.image_size}, {args.image_size}, 1): 1.0}}"]
    if args.model:
        args.model_dir, folder = args.model, args.model
    else:
        args.model_dir = builder(models.default_models_dir() / folder)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"command": shlex.join(["python", "benchmarks/serving_throughput.py", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "mix": args.mix, "model": folder,
              "environment": environment(), "dtype": args.dtype, "reps": args.reps,
              "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
              "kv_cache_memory_bytes": args.kv_bytes, "max_num_seqs": args.max_num_seqs,
              "serve_args": mix_serve_args, "attentionpack_settings": args.settings, "backends": {}}
    for name in ("dense", "attentionpack"):
        result["backends"][name] = run_backend(name, args, mix_args, mix_serve_args)
    d, a = result["backends"]["dense"], result["backends"]["attentionpack"]
    result["ratios_attentionpack_over_dense"] = {
        k: a["median"][k] / d["median"][k] if d["median"][k] else None for k in d["median"]}
    result["ratios_attentionpack_over_dense"]["kv_cache_tokens"] = a["kv_cache_tokens"] / d["kv_cache_tokens"]
    for k, v in result["ratios_attentionpack_over_dense"].items():
        print(f"[serving] AttentionPack / dense, {k}: {v:.2f}x" if v is not None else f"{k}: n/a")
    stem = tagged(f"serving_{args.mix}", args.tag)
    save_json(RESULTS, stem, "", result)
    plot(result, RESULTS / f"{stem}.png")
    print(f"[serving] saved benchmarks/results/{stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
