#!/usr/bin/env python
"""Compile the decode kernels for a GPU architecture without a GPU, and report their resources.

Runs every Triton kernel of `latent_decode_attention_triton` and
`dense_paged_decode_attention` exactly as a call would launch it (same arguments and
compile-time constants, taken from a real call whose launches are intercepted), but
compiles them with `triton.compile` for the target architecture (default sm_90, the
H100) instead of running them, then reads registers, spills and shared memory from
the cubin with the `cuobjdump` that ships with Triton. Catches what the CPU
interpreter cannot: code generation errors, shared memory overflow, register spills.

    python benchmarks/compile_check.py [--arch 90] [--json PATH]

Needs torch and triton (with its NVIDIA backend); no GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# (name, kernels module call, shapes): LLaVA-1.5-7B and Qwen2-VL-7B geometry, rank 64, and a few switches
LATENT_CONFIGS = [
    dict(name="llava fp16 image", heads=32, kv=32, partial_k=False, partial_v=False, image=True, dtype="float16"),
    dict(name="llava fp16 image partial-v probs", heads=32, kv=32, partial_k=False, partial_v=True, image=True,
         dtype="float16", probs=True),
    dict(name="llava fp16 text partial-kv probs", heads=32, kv=32, partial_k=True, partial_v=True, image=False,
         dtype="float16", probs=True),
    dict(name="qwen2vl fp16 image partial-v probs", heads=28, kv=4, partial_k=False, partial_v=True, image=True,
         dtype="float16", probs=True),
    dict(name="llava bf16 image probs", heads=32, kv=32, partial_k=False, partial_v=True, image=True,
         dtype="bfloat16", probs=True),
    dict(name="llava fp32 image probs", heads=32, kv=32, partial_k=True, partial_v=True, image=True,
         dtype="float32", probs=True),
    dict(name="llava fp16 int8 image partial-v probs", heads=32, kv=32, partial_k=False, partial_v=True, image=True,
         dtype="float16", probs=True, int8=True),
    dict(name="qwen2vl fp16 int8 image partial-kv probs", heads=28, kv=4, partial_k=True, partial_v=True,
         image=True, dtype="float16", probs=True, int8=True),
    dict(name="llava bf16 int8 text probs", heads=32, kv=32, partial_k=False, partial_v=False, image=False,
         dtype="bfloat16", probs=True, int8=True),
]
DENSE_CONFIGS = [
    dict(name="llava fp16 batch 1 (splits)", heads=32, kv=32, batch=1, dtype="float16"),
    dict(name="llava fp16 batch 256 (one split)", heads=32, kv=32, batch=256, dtype="float16", pages_per_split=64),
    dict(name="qwen2vl fp16 batch 1 (splits)", heads=28, kv=4, batch=1, dtype="float16"),
    dict(name="llava fp32 batch 1", heads=32, kv=32, batch=1, dtype="float32"),
]
TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "int8": "i8", "int32": "i32", "int64": "i64"}


def record_launches(module, names):
    """Replace the module's kernels by recorders of (kernel, args, kwargs, grid); returns the list."""
    calls = []
    for name in names:
        real = getattr(module, name)

        class Recorder:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                return lambda *args, **kwargs: calls.append((self.kernel, args, kwargs, tuple(grid)))
        setattr(module, name, Recorder(real))
    return calls


def signature_of(kernel, args, kwargs):
    """Signature, constants, options and the JIT's divisibility hints (base pointers of torch
    allocations and integers that are multiples of 16 are marked divisible by 16, as a launch does)."""
    import torch
    sig, constexprs, attrs = {}, {}, {}
    for index, (name, value) in enumerate(zip(kernel.arg_names, args)):
        if (isinstance(value, torch.Tensor) and value.storage_offset() == 0) or (
                isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + TYPES[str(value.dtype).replace("torch.", "")]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(value)}")
    options = {}
    for name, value in kwargs.items():
        if name in ("num_warps", "num_stages"):
            options[name] = value
        else:
            sig[name] = "constexpr"
            constexprs[name] = value
    return sig, constexprs, attrs, options


def resources(cubin: bytes, cuobjdump: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    out = {}
    for key, pattern in (("registers", r"REG:(\d+)"), ("shared_bytes", r"SHARED:(\d+)"),
                         ("stack_bytes", r"STACK:(\d+)"), ("local_bytes", r"LOCAL:(\d+)")):
        match = re.search(pattern, text)
        out[key] = int(match.group(1)) if match else None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tile", type=int, help="latent pass tile (default: the module's TUNING)")
    parser.add_argument("--pass-warps", type=int, help="latent pass warps (default: the module's TUNING)")
    parser.add_argument("--only", help="only configurations whose name contains this")
    args = parser.parse_args(argv)

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO / "tests"))
    from _kernels import load_kernels
    K = load_kernels()
    from latent_cases import random_case
    cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    target = GPUTarget("cuda", args.arch, 32)
    LX, DX = K.latent_decode_triton, K.dense_paged_triton

    # Latent: real calls on meta tensors (no values needed), the CUDA tuning, an H100's SM count.
    if args.tile:
        LX.TUNING["tile"] = args.tile
    if args.pass_warps:
        LX.TUNING["pass_warps"] = args.pass_warps
    LX._interpreted = lambda: False
    LX._sm_count = lambda device: 132
    calls = record_launches(LX, ("_project_queries", "_latent_pass", "_combine", "_probs_pass"))
    jobs = []
    for cfg in [c for c in LATENT_CONFIGS if not args.only or args.only in c["name"]]:
        dtype = getattr(torch, cfg["dtype"])
        case = random_case(K, compressed_lens=[40, 9], window_lens=[16, 1], num_heads=cfg["heads"],
                           num_kv_heads=cfg["kv"], head_size=128, rank_k=64, rank_v=64, block_size=16, window=32,
                           has_image=cfg["image"], partial_k=cfg["partial_k"], partial_v=cfg["partial_v"],
                           int8=cfg.get("int8", False))
        meta = lambda t: t.to("meta", dtype) if t.is_floating_point() else t.to("meta")  # noqa: E731
        batch = K.decode_inputs.make_decode_batch(
            meta(case.block_table), case.slot_ids, [1000] * 2, [16, 1], window_size=32, block_size=16,
            with_index=False)
        calls.clear()
        rows = case.rows   # int8 rows and float32 scales keep their dtypes
        meta_rows = type(rows)(meta(rows.arena), None if rows.scales is None else rows.scales.to("meta"),
                               *(rows.map(n).to("meta") for n in ("basis_k", "basis_v", "window_k", "window_v")))
        LX._latent_decode(meta(case.query), meta(case.pages), meta_rows, batch, case.spec, case.scale,
                          cfg.get("probs", False))
        jobs += [(cfg["name"], c) for c in calls]
    DX._interpreted = lambda: False
    DX._sm_count = lambda device: 132
    dense_calls = record_launches(DX, ("_dense_pass", "_dense_combine"))
    for cfg in [c for c in DENSE_CONFIGS if not args.only or args.only in c["name"]]:
        dtype = getattr(torch, cfg["dtype"])
        blocks = 63
        pages = torch.empty(cfg["batch"] * blocks, 16, 2, cfg["kv"], 128, dtype=dtype, device="meta")
        table = torch.empty(cfg["batch"], blocks, dtype=torch.int32, device="meta")
        lens = torch.empty(cfg["batch"], dtype=torch.int32, device="meta")
        query = torch.empty(cfg["batch"], cfg["heads"], 128, dtype=dtype, device="meta")
        dense_calls.clear()
        DX.dense_paged_decode_attention(query, pages, table, lens, 0.088, max_seq_len=1000,
                                        pages_per_split=cfg.get("pages_per_split"))
        jobs += [(cfg["name"], c) for c in dense_calls]

    rows, failed = [], 0
    for name, (kernel, call_args, kwargs, grid) in jobs:
        sig, constexprs, attrs, options = signature_of(kernel, call_args, kwargs)
        start = time.perf_counter()
        row = dict(config=name, kernel=kernel.__name__, grid=grid, num_warps=options.get("num_warps", 4))
        try:
            compiled = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=target, options=options)
            row.update(resources(compiled.asm["cubin"], cuobjdump))
            row["shared_bytes_triton"] = compiled.metadata.shared
            row["ok"] = True
        except Exception as error:  # noqa: BLE001 - report every failure
            row.update(ok=False, error=f"{type(error).__name__}: {str(error)[:2000]}")
            failed += 1
        row["compile_seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        spill = row.get("local_bytes") or row.get("stack_bytes")
        print(f"{'ok  ' if row['ok'] else 'FAIL'} sm_{args.arch} {name:38s} {row['kernel']:16s} grid {str(grid):14s} "
              f"warps {row['num_warps']} regs {row.get('registers')} shared {row.get('shared_bytes_triton')} "
              f"local/stack {spill} ({row['compile_seconds']}s)" + ("" if row["ok"] else "\n" + row["error"]),
              flush=True)
    spills = [r for r in rows if r.get("ok") and ((r.get("local_bytes") or 0) or (r.get("stack_bytes") or 0))]
    if args.json:
        args.json.write_text(json.dumps(dict(arch=args.arch, triton=triton.__version__, torch=torch.__version__,
                                             rows=rows), indent=1))
    print(f"{len(rows) - failed} compiled, {failed} failed; spilling: "
          f"{', '.join(sorted({r['config'] + ' ' + r['kernel'] for r in spills})) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
