#!/usr/bin/env python
"""CUDA-graph check of the latent decode: capture once, replay on new inputs, compare.

The captured region is the part of a decode step that runs per layer on the GPU:
write the new token's K/V into its window row (`index_put_` by slot id and row),
then the whole `latent_decode_attention_triton` call. It is captured once with a
padded length bound, then for several input sets (other lengths, block tables,
slots, records, bases, windows, queries) the inputs are copied into the captured
buffers and the graph is replayed. Every replay must equal the same step run eagerly,
bit for bit, and the PyTorch path within tolerance. Also times the step eagerly and
as a graph replay.

    python benchmarks/cuda_graph_check.py [--out DIR]      # GPU
    python benchmarks/cuda_graph_check.py --cpu-dry-run    # CPU, interpreter, tiny shapes, no capture

Writes cuda_graph_check_<card>.json (exit status 1 if a check fails). Needs torch
and triton only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# name: geometry and plan; input sets: (compressed lengths, window lengths) per replay
CASES = {
    "llava-7b-geometry, image+text, partial V": dict(
        shape=dict(num_heads=32, num_kv_heads=32, head_size=128, rank_k=64, rank_v=64, block_size=16,
                   window=32, has_image=True, partial_v=True, num_blocks=600, max_blocks=64, num_slots=12),
        inputs=[([0, 37, 600, 1000, 250, 999, 16, 512], [1, 32, 7, 16, 3, 30, 12, 1]),
                ([1008, 5, 0, 333, 700, 64, 1, 900], [2, 1, 32, 20, 9, 5, 31, 16]),
                ([10, 20, 30, 40, 50, 60, 70, 80], [32, 31, 30, 29, 28, 27, 26, 25])],
        bound=1024),
    "qwen2-vl-7b-geometry, text only, partial K and V": dict(
        shape=dict(num_heads=28, num_kv_heads=4, head_size=128, rank_k=64, rank_v=64, block_size=16,
                   window=32, has_image=False, partial_k=True, partial_v=True, num_blocks=300, max_blocks=64,
                   num_slots=6),
        inputs=[([900, 0, 17, 1000], [4, 1, 32, 16]), ([3, 998, 512, 64], [32, 9, 1, 2])],
        bound=1024),
}
DRY_CASES = {
    "tiny, image+text, partial V": dict(
        shape=dict(num_heads=4, num_kv_heads=2, head_size=16, rank_k=16, rank_v=16, block_size=8, window=4,
                   has_image=True, partial_v=True, num_blocks=24, max_blocks=8, num_slots=5),
        inputs=[([0, 30, 9], [1, 4, 2]), ([40, 3, 17], [3, 1, 4])], bound=48),
    "tiny, text only, partial K and V": dict(
        shape=dict(num_heads=4, num_kv_heads=1, head_size=16, rank_k=16, rank_v=16, block_size=8, window=4,
                   has_image=False, partial_k=True, partial_v=True, num_blocks=24, max_blocks=8, num_slots=5),
        inputs=[([25, 0], [2, 4]), ([6, 33], [1, 3])], bound=48),
}
TOLERANCE = {"out": 1e-2, "probs": 2e-3}   # fp16 against the float32 PyTorch path


def card_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "benchmarks" / "results"))
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="CPU under TRITON_INTERPRET=1, tiny shapes, the buffers refilled without capture")
    args = parser.parse_args(argv)
    if args.cpu_dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("cuda_graph_check: no CUDA GPU (use --cpu-dry-run on CPU)", file=sys.stderr)
        return 2
    import triton
    import triton.testing
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO / "tests"))
    from _kernels import load_kernels
    K = load_kernels()
    from latent_cases import capture, decode_step, random_case, replay_against_eager, same_outputs

    device = "cpu" if args.cpu_dry_run else "cuda"
    card = "cpu-dry-run" if args.cpu_dry_run else torch.cuda.get_device_name(0)
    cases = DRY_CASES if args.cpu_dry_run else CASES
    dtype = torch.float16
    checks, all_ok = [], True
    for name, spec in cases.items():
        batch_size = len(spec["inputs"][0][0])
        width = spec["shape"]["num_kv_heads"] * spec["shape"]["head_size"]
        inputs = [random_case(K, compressed_lens=c, window_lens=w, dtype=dtype, device=device, seed=i,
                              **spec["shape"]) for i, (c, w) in enumerate(spec["inputs"])]
        gen = torch.Generator().manual_seed(1)
        new_kv = [tuple(torch.randn(batch_size, width, generator=gen).to(device, dtype) for _ in "kv")
                  for _ in inputs]
        for need_probs in (False, True):
            start = time.perf_counter()
            results = replay_against_eager(K, inputs, new_kv, spec["bound"], need_probs,
                                           use_graph=not args.cpu_dry_run)
            entry = dict(case=name, need_probs=need_probs, bound=spec["bound"], batch=batch_size,
                         input_sets=[dict(compressed_lens=c, window_lens=w) for c, w in spec["inputs"]],
                         replay_equals_eager=[], window_equal=[], max_err_out=[], max_err_probs=[])
            for result in results:
                entry["replay_equals_eager"].append(same_outputs(result["graph"], result["eager"]))
                entry["window_equal"].append(result["window_equal"])
                got, ref = result["graph"], result["reference"]
                entry["max_err_out"].append(float((got[0].float() - ref[0].float()).abs().max()))
                if need_probs:
                    entry["max_err_probs"].append(max(float((a - b).abs().max()) for a, b in zip(got[1:], ref[1:])))
            entry["ok"] = (all(entry["replay_equals_eager"]) and all(entry["window_equal"])
                           and max(entry["max_err_out"]) <= TOLERANCE["out"]
                           and max(entry["max_err_probs"] or [0.0]) <= TOLERANCE["probs"])
            # The step eagerly against one graph replay (first input set). The dry run times one
            # call of each with the eager step standing in for the graph (meaningless numbers).
            case = inputs[0]
            batch = case.batch(K, with_index=False, max_compressed_len=spec["bound"])

            def step():
                return decode_step(K, case, batch, *new_kv[0], need_probs)

            if args.cpu_dry_run:
                replay = step

                def bench(fn):
                    begin = time.perf_counter()
                    fn()
                    return (time.perf_counter() - begin) * 1e6
            else:
                graph, _ = capture(step)
                replay = graph.replay

                def bench(fn):
                    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
            entry["eager_us"], entry["graph_us"] = bench(step), bench(replay)
            replay = graph = None
            entry["seconds"] = round(time.perf_counter() - start, 2)
            all_ok = all_ok and entry["ok"]
            checks.append(entry)
            timing = (f"; step eager {entry['eager_us']:.1f}us, graph replay {entry['graph_us']:.1f}us"
                      + (" (dry run: no graph, times meaningless)" if args.cpu_dry_run else ""))
            print(f"{'OK  ' if entry['ok'] else 'FAIL'} {name}, need_probs={need_probs}: replay == eager "
                  f"{entry['replay_equals_eager']}, windows equal {entry['window_equal']}, max err vs PyTorch "
                  f"{max(entry['max_err_out']):.2e} (probs {max(entry['max_err_probs'] or [0.0]):.2e}){timing}",
                  flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cuda_graph_check_{card_slug(card)}.json"
    path.write_text(json.dumps(dict(
        card=card, dry_run=args.cpu_dry_run, ok=all_ok, torch=torch.__version__, triton=triton.__version__,
        kernels=K.source, command=" ".join([sys.executable] + sys.argv), tolerance=TOLERANCE,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        note=("CPU dry run: the captured buffers are refilled and the call rerun, no CUDA graph"
              if args.cpu_dry_run else "captured once per case, replayed on every input set"),
        checks=checks), indent=1))
    print(f"{'all checks passed' if all_ok else 'SOME CHECKS FAILED'}; saved {path}", flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
