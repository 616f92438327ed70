#!/usr/bin/env python
"""Decode attention time per step: AttentionPack's fused kernel against dense baselines.

For each configuration (geometry, batch, context, rank, partial rank on/off) one
decode step of one layer is timed three ways, on the same number of tokens:

* AP: `latent_decode_attention_triton` over an AttentionPack paged cache (records
  `[K'|V'|importance|flags]`, bases and a half-full 32-token window in a slot pool
  of `batch` slots); the whole call (query projection, page pass, combine and, with
  partial rank, the probabilities pass the importance EMA needs).
* dense-Triton: `dense_paged_decode_attention`, the dense paged kernel of the same
  structure, reading full K and V from vLLM-layout pages.
* SDPA: `torch.nn.functional.scaled_dot_product_attention` on contiguous dense K/V
  `[batch, heads, T, D]` (the same K/V as the dense pages).

Partial rank on = the default groups (top 25 % of tokens at full rank, the rest at
a quarter of the rank, values only) with need_probs=True; off = all columns read,
need_probs=False. Contexts count all tokens: AP holds `context - 16` as records and
16 in the window. The first 576 positions are image tokens, the rest text; 25 % of
the tokens are in group 0.

Bytes per step: AP counts the record columns actually read (K' columns and flags;
V' columns per token's group; with need_probs K' and flags again plus the fp32
probabilities written), the request's bases (both modalities, K and V) and its
whole window (K and V); dense counts `2 * num_kv_heads * head_size` elements per
token. Query, output and split partials are left out of both.

Timing: triton.testing.do_bench (L2 flushed before every run), median, after a
warm-up; every configuration is seeded. Outputs are checked before timing: AP
against the PyTorch latent path, dense-Triton against SDPA.

    python benchmarks/kernel_bench.py            # full grid (GPU)
    python benchmarks/kernel_bench.py --quick    # LLaVA, batch 1 and 64, context 1000, rank 64
    python benchmarks/kernel_bench.py --smoke    # CPU, Triton interpreter, tiny shapes: plumbing only

Needs torch and triton only (matplotlib for the plot); never imports vLLM.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"


@dataclass(frozen=True)
class Geometry:
    name: str
    num_heads: int
    num_kv_heads: int
    head_size: int

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_size


GEOMETRIES = {
    "llava": Geometry("LLaVA-1.5-7B", 32, 32, 128),
    "qwen2vl": Geometry("Qwen2-VL-7B", 28, 4, 128),
}
SMOKE_GEOMETRY = Geometry("tiny-smoke", 4, 2, 32)

BATCHES = (1, 8, 64, 256)
CONTEXTS = (600, 1000, 4000, 8000)
RANKS = (32, 64, 128)
IMAGE_TOKENS = 576
WINDOW_SIZE = 32
WINDOW_FILL = 16
GROUP_FRACTIONS = (0.25, 0.75)   # the defaults: group 0 at full rank ...
GROUP_RANK_SCALES = (1.0, 0.25)  # ... the rest at a quarter of the rank (values only)

TARGET = dict(geometry="LLaVA-1.5-7B", batch=64, context=1000, rank=64)
TARGET_SPEEDUP = 5.0

# Peak DRAM bandwidth (GB/s) by device name; first match wins (all words must occur).
PEAK_GBPS = (
    (("H100", "PCIE"), 2000.0),
    (("H100", "NVL"), 3900.0),
    (("H100",), 3350.0),          # SXM (HBM3)
    (("H200",), 4800.0),
    (("A100", "80GB", "PCIE"), 1935.0),
    (("A100", "80GB"), 2039.0),   # SXM
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small subset: LLaVA geometry, batch 1 and 64, context 1000, rank 64")
    p.add_argument("--smoke", action="store_true",
                   help="CPU under TRITON_INTERPRET=1 with tiny shapes: checks the script end to end, "
                        "times nothing meaningful")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON and PNG")
    p.add_argument("--bf16", action="store_true", help="bfloat16 storage (default float16)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--geometries", nargs="+", choices=sorted(GEOMETRIES), help="subset of geometries")
    p.add_argument("--batches", nargs="+", type=int, help="override the batch sizes")
    p.add_argument("--contexts", nargs="+", type=int, help="override the context lengths")
    p.add_argument("--ranks", nargs="+", type=int, help="override the ranks")
    p.add_argument("--max-dense-gb", type=float, default=20.0,
                   help="skip configurations whose dense cache exceeds this many GB (SDPA's "
                        "contiguous copy needs as much again)")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="peak memory bandwidth for %%-of-peak (default: looked up by card name)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up time")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measuring time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    return p.parse_args(argv)


def progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def card_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "unknown"


def peak_bandwidth(card: str, flag: float | None) -> tuple[float | None, str]:
    if flag is not None:
        return flag, "--peak-gbps"
    upper = card.upper()
    for words, gbps in PEAK_GBPS:
        if all(w in upper for w in words):
            return gbps, f"table ({' '.join(words)})"
    return None, "unknown card: pass --peak-gbps"


# --------------------------------------------------------------------------- caches

def build_dense(torch, geom: Geometry, batch: int, context: int, block_size: int, dtype, device):
    """Dense pages [num_blocks, block_size, 2, kvh, D] with shuffled blocks, and a query."""
    blocks = -(-context // block_size)
    num_blocks = batch * blocks
    pages = torch.randn(num_blocks, block_size, 2, geom.num_kv_heads, geom.head_size,
                        dtype=dtype, device=device)
    block_table = torch.randperm(num_blocks, device=device).view(batch, blocks).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query = torch.randn(batch, geom.num_heads, geom.head_size, dtype=dtype, device=device)
    return pages, block_table, seq_lens, query


def contiguous_kv(torch, pages, block_table, context: int):
    """The same K/V as the pages, contiguous: two [batch, kvh, T, D] tensors."""
    batch = block_table.shape[0]
    _, _, _, kvh, head_size = pages.shape
    k = torch.empty(batch, kvh, context, head_size, dtype=pages.dtype, device=pages.device)
    v = torch.empty_like(k)
    for b in range(batch):  # one request at a time: no full-size temporary
        kv = pages[block_table[b].long()].reshape(-1, 2, kvh, head_size)[:context]
        k[b] = kv[:, 0].transpose(0, 1)
        v[b] = kv[:, 1].transpose(0, 1)
    return k, v


@dataclass
class ApCache:
    layout: object
    pages: object
    block_table: object
    compressed_lens: object
    slot_ids: object
    basis_k: object
    basis_v: object
    window_k: object
    window_v: object
    window_lens: object
    flags: object            # [batch, compressed_len] int64 (for byte counts)
    compressed_len: int
    window_len: int


def orthonormal_bases(torch, count: int, rank: int, width: int, dtype, device):
    """[count, rank, width]: rows orthonormal (QR of a Gaussian matrix)."""
    q, _ = torch.linalg.qr(torch.randn(count, width, rank, device=device))
    return q.transpose(1, 2).contiguous().to(dtype)


def build_ap(torch, K, geom: Geometry, batch: int, context: int, rank: int, block_size: int,
             dtype, device, image_tokens: int) -> ApCache:
    layout = K.layout.RecordLayout(rank_k=rank, rank_v=rank)
    window_len = min(WINDOW_FILL, context - 1)
    clen = context - window_len
    blocks = -(-clen // block_size)
    num_blocks = batch * blocks
    pos = torch.arange(clen, device=device)
    modality = torch.where(pos < image_tokens, K.layout.IMAGE, K.layout.TEXT).expand(batch, clen)
    group = (torch.rand(batch, clen, device=device) >= GROUP_FRACTIONS[0]).long()  # 25 % in group 0
    flags = K.layout.encode_flags(modality, group)
    records = torch.zeros(batch, blocks * block_size, layout.width, dtype=dtype, device=device)
    records[:, :clen, layout.k_offset:layout.k_offset + rank] = torch.randn(batch, clen, rank, device=device).to(dtype)
    records[:, :clen, layout.v_offset:layout.v_offset + rank] = torch.randn(batch, clen, rank, device=device).to(dtype)
    records[:, :clen, layout.importance_offset] = torch.rand(batch, clen, device=device).to(dtype)
    records[:, :clen, layout.flags_offset] = flags.to(dtype)
    pages = torch.empty(num_blocks, block_size, layout.width, dtype=dtype, device=device)
    block_table = torch.randperm(num_blocks, device=device).view(batch, blocks)
    pages[block_table] = records.view(batch, blocks, block_size, layout.width)
    del records
    width = geom.kv_width
    basis_k = orthonormal_bases(torch, batch * 2, rank, width, dtype, device).view(batch, 2, rank, width)
    basis_v = orthonormal_bases(torch, batch * 2, rank, width, dtype, device).view(batch, 2, rank, width)
    return ApCache(
        layout=layout, pages=pages, block_table=block_table.to(torch.int32),
        compressed_lens=torch.full((batch,), clen, dtype=torch.int32, device=device),
        slot_ids=torch.randperm(batch, device=device).to(torch.int32),
        basis_k=basis_k, basis_v=basis_v,
        window_k=torch.randn(batch, WINDOW_SIZE, width, dtype=dtype, device=device),
        window_v=torch.randn(batch, WINDOW_SIZE, width, dtype=dtype, device=device),
        window_lens=torch.full((batch,), window_len, dtype=torch.int32, device=device),
        flags=flags, compressed_len=clen, window_len=window_len)


def group_cols(torch, rank: int, partial: bool, device):
    """([2, groups] K' columns, [2, groups] V' columns) per (modality, group)."""
    full = [rank] * len(GROUP_RANK_SCALES)
    scaled = [max(1, math.ceil(rank * s)) for s in GROUP_RANK_SCALES]
    cols_v = scaled if partial else full
    as_tensor = lambda cols: torch.tensor([cols, cols], dtype=torch.int32, device=device)  # noqa: E731
    return as_tensor(full), as_tensor(cols_v)


def ap_bytes(torch, ap: ApCache, cols_k, cols_v, need_probs: bool, item: int) -> int:
    modality, group = ap.flags % 2, ap.flags // 2
    tokens = ap.flags.numel()
    read_k = int(cols_k.long()[modality, group].sum())
    read_v = int(cols_v.long()[modality, group].sum())
    records = (read_k + read_v + tokens) * item                # K', V' per group, flags
    if need_probs:
        records += (read_k + tokens) * item + tokens * 4       # K' and flags again, fp32 probs out
    batch, _, rank_k, width = ap.basis_k.shape
    rank_v = ap.basis_v.shape[2]
    bases = batch * 2 * (rank_k + rank_v) * width * item
    window = batch * 2 * WINDOW_SIZE * width * item
    return records + bases + window


# --------------------------------------------------------------------------- timing

def make_timer(torch, args):
    if args.smoke:
        def timer(fn):
            fn()  # first call compiles / interprets once more
            times = []
            for _ in range(2):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return statistics.median(times) * 1e6
        return timer
    import triton.testing

    def timer(fn):
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms,
                                       return_mode="median") * 1e3
    return timer


def probe_sdpa_backends(torch, geom: Geometry, dtype, device, has_gqa: bool) -> list[str]:
    """SDPA backends that accept this geometry's decode inputs (the dispatcher picks among them)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return ["unknown"]
    heads_kv = geom.num_kv_heads if has_gqa else geom.num_heads
    q = torch.randn(2, geom.num_heads, 1, geom.head_size, dtype=dtype, device=device)
    k = torch.randn(2, heads_kv, 64, geom.head_size, dtype=dtype, device=device)
    gqa = dict(enable_gqa=True) if has_gqa and heads_kv != geom.num_heads else {}
    names = []
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with warnings.catch_warnings(), sdpa_kernel(backend):
                warnings.simplefilter("ignore")  # each refusing backend warns why
                torch.nn.functional.scaled_dot_product_attention(q, k, k, **gqa)
            names.append(name.lower())
        except RuntimeError:
            pass
    return names


def close(torch, got, ref, tol: float) -> tuple[float, bool]:
    got, ref = got.float(), ref.float()
    err = float((got - ref).abs().max()) if got.numel() else 0.0
    ok = bool(torch.isfinite(got).all()) and bool(torch.allclose(got, ref, rtol=tol, atol=tol))
    return err, ok


def gbps(nbytes: int, us: float) -> float:
    return nbytes / (us * 1e-6) / 1e9


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}B"


# --------------------------------------------------------------------------- main loop

def run(args) -> int:
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if not args.smoke:
        if not torch.cuda.is_available():
            print("kernel_bench: no CUDA GPU found. Run it on a GPU machine, or pass --smoke for a "
                  "CPU end-to-end check of the script (it times nothing meaningful).", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            print("kernel_bench: TRITON_INTERPRET=1 is set; unset it to time the kernels on the GPU "
                  "(or pass --smoke).", file=sys.stderr)
            return 2

    import triton

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _kernels import load_kernels
    K = load_kernels()
    latent = K.latent_decode_triton.latent_decode_attention_triton
    latent_ref = K.latent_decode_torch.latent_decode_attention
    dense = K.dense_paged_triton.dense_paged_decode_attention
    sdpa = torch.nn.functional.scaled_dot_product_attention

    dtype = torch.bfloat16 if args.bf16 else torch.float16
    item = torch.empty(0, dtype=dtype).element_size()
    tol = 2e-2 if dtype == torch.float16 else 5e-2
    if args.smoke:
        device = torch.device("cpu")
        card = "smoke-cpu"
        geometries = [SMOKE_GEOMETRY]
        batches, contexts, ranks, image_tokens = [2], [40], [16], 16
    else:
        device = torch.device("cuda")
        card = torch.cuda.get_device_name(device)
        geometries = [GEOMETRIES[g] for g in (args.geometries or GEOMETRIES)]
        batches, contexts, ranks, image_tokens = list(BATCHES), list(CONTEXTS), list(RANKS), IMAGE_TOKENS
        if args.quick:
            geometries = [g for g in geometries if g.name == TARGET["geometry"]] or [GEOMETRIES["llava"]]
            batches, contexts, ranks = [1, 64], [1000], [64]
    batches = args.batches or batches
    contexts = args.contexts or contexts
    ranks = args.ranks or ranks
    peak, peak_source = (None, "smoke run: no bandwidth") if args.smoke else peak_bandwidth(card, args.peak_gbps)

    try:
        sdpa(torch.zeros(1, 2, 1, 16), torch.zeros(1, 1, 2, 16), torch.zeros(1, 1, 2, 16), enable_gqa=True)
        has_gqa = True
    except TypeError:
        has_gqa = False

    suffix = "_quick" if args.quick and not args.smoke else ""
    stem = f"kernel_bench_{'smoke_cpu' if args.smoke else card_slug(card)}{suffix}{args.tag and '_' + args.tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / f"{stem}.json", args.out / f"{stem}.png"

    header = dict(
        command=shlex.join(getattr(sys, "orig_argv", [sys.executable] + sys.argv)),
        argv=sys.argv, cwd=os.getcwd(), card=card, smoke=args.smoke,
        note=("SMOKE RUN: CPU, Triton interpreter, tiny shapes; the times are NOT meaningful"
              if args.smoke else "decode attention time per step, one layer; median of do_bench, L2 flushed"),
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        python=platform.python_version(), kernels=K.source,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        dtype=str(dtype).replace("torch.", ""), block_size=args.block_size, seed=args.seed,
        window_size=WINDOW_SIZE, window_fill=WINDOW_FILL, image_tokens=image_tokens,
        group_fractions=GROUP_FRACTIONS, group_rank_scales=GROUP_RANK_SCALES,
        peak_gbps=peak, peak_source=peak_source, max_dense_gb=args.max_dense_gb,
        sdpa_gqa="enable_gqa" if has_gqa else "repeat_interleave",
        sdpa_backends_accepting={g.name: probe_sdpa_backends(torch, g, dtype, device, has_gqa)
                                 for g in geometries},
        geometries=[g.__dict__ for g in geometries], batches=batches, contexts=contexts, ranks=ranks)
    rows: list[dict] = []

    def save(complete: bool) -> None:
        header.update(complete=complete, vllm_imported="vllm" in sys.modules)
        json_path.write_text(json.dumps(dict(header, rows=rows), indent=1))

    if args.smoke:
        print("SMOKE RUN: CPU under TRITON_INTERPRET=1 with tiny shapes; this checks that the script "
              "works end to end and times NOTHING meaningful.", flush=True)
    else:
        print(f"card: {card}; peak {peak if peak else '?'} GB/s ({peak_source}); {header['dtype']}, "
              f"block_size {args.block_size}; torch {torch.__version__}, triton {triton.__version__}; "
              f"SDPA backends accepting the inputs: {header['sdpa_backends_accepting']}", flush=True)

    def pct(bw):
        return None if not peak else 100.0 * bw / peak

    def pct_str(bw):
        return "" if not peak else f" ({100.0 * bw / peak:.1f}%)"

    timer = make_timer(torch, args)
    blocks = [(g, b, c) for g in geometries for b in batches for c in contexts]
    for index, (geom, batch, context) in enumerate(blocks, 1):
        dense_bytes = batch * context * 2 * geom.kv_width * item
        dense_gb = dense_bytes / 1e9
        where = f"[{index}/{len(blocks)}] {geom.name} batch {batch} context {context}"
        base_row = dict(geometry=geom.name, num_heads=geom.num_heads, num_kv_heads=geom.num_kv_heads,
                        head_size=geom.head_size, batch=batch, context=context, dense_gb=dense_gb)
        if dense_gb > args.max_dense_gb:
            print(f"{geom.name} batch {batch} context {context}: skipped: {dense_gb:.1f} GB dense cache "
                  f"> --max-dense-gb {args.max_dense_gb:g}", flush=True)
            rows.append(dict(base_row, status="skipped", reason=f"dense cache {dense_gb:.1f} GB"))
            save(False)
            continue
        torch.manual_seed(args.seed)
        scale = geom.head_size ** -0.5
        try:
            # Dense baselines: timed once per (geometry, batch, context); rank does not matter.
            progress(f"{where}: dense cache {dense_gb:.2f} GB, dense-Triton")
            pages, block_table, seq_lens, query = build_dense(
                torch, geom, batch, context, args.block_size, dtype, device)
            dense_fn = lambda: dense(query, pages, block_table, seq_lens, scale, max_seq_len=context)  # noqa: E731
            out_dense = dense_fn()
            dense_us = timer(dense_fn)
            progress(f"{where}: SDPA")
            k, v = contiguous_kv(torch, pages, block_table, context)
            del pages, block_table
            if not has_gqa and geom.num_heads != geom.num_kv_heads:
                k = k.repeat_interleave(geom.num_heads // geom.num_kv_heads, dim=1)
                v = v.repeat_interleave(geom.num_heads // geom.num_kv_heads, dim=1)
            q4 = query.unsqueeze(2)
            gqa = dict(enable_gqa=True) if has_gqa and geom.num_heads != geom.num_kv_heads else {}
            sdpa_fn = lambda: sdpa(q4, k, v, scale=scale, **gqa)  # noqa: E731
            out_sdpa = sdpa_fn().squeeze(2)
            sdpa_us = timer(sdpa_fn)
            dense_err, dense_ok = close(torch, out_dense, out_sdpa, tol)
            del k, v, q4, out_dense, out_sdpa
        except torch.cuda.OutOfMemoryError:
            print(f"{geom.name} batch {batch} context {context}: skipped: out of memory "
                  f"({dense_gb:.1f} GB dense cache, twice that with SDPA's copy)", flush=True)
            rows.append(dict(base_row, status="skipped", reason="out of memory (dense)"))
            pages = block_table = k = v = q4 = out_dense = out_sdpa = None
            torch.cuda.empty_cache()
            save(False)
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not dense_ok:
            print(f"WARNING {where}: dense-Triton differs from SDPA (max abs err {dense_err:.3g})", flush=True)

        for rank in ranks:
            rank = min(rank, geom.kv_width)
            progress(f"{where}: AttentionPack cache, rank {rank}")
            try:
                torch.manual_seed(args.seed + rank)
                ap = build_ap(torch, K, geom, batch, context, rank, args.block_size, dtype, device, image_tokens)
            except torch.cuda.OutOfMemoryError:
                print(f"{where} rank {rank}: skipped: out of memory building the AttentionPack cache", flush=True)
                rows.append(dict(base_row, rank=rank, status="skipped", reason="out of memory (AP)"))
                torch.cuda.empty_cache()
                continue
            for partial in (False, True):
                cols_k, cols_v = group_cols(torch, rank, partial, device)
                ap_args = (query, ap.pages, ap.block_table, ap.compressed_lens, ap.slot_ids, ap.basis_k,
                           ap.basis_v, ap.window_k, ap.window_v, ap.window_lens, cols_k, cols_v,
                           ap.layout, scale)
                ap_kwargs = dict(max_compressed_len=ap.compressed_len, need_probs=partial)
                ap_fn = lambda: latent(*ap_args, **ap_kwargs)  # noqa: E731
                got = ap_fn()
                ap_err, ap_ok = None, None
                if not args.no_check:
                    try:
                        ref = latent_ref(*ap_args, **ap_kwargs)
                        ap_err, ap_ok = close(torch, got[0], ref[0], tol)
                        if partial:
                            p_err, p_ok = close(torch, got[1], ref[1], 1e-3)
                            ap_err, ap_ok = max(ap_err, p_err), ap_ok and p_ok
                        del ref
                    except torch.cuda.OutOfMemoryError:
                        progress(f"{where}: PyTorch reference out of memory; AP check skipped")
                        torch.cuda.empty_cache()
                del got
                ap_us = timer(ap_fn)
                nbytes = ap_bytes(torch, ap, cols_k, cols_v, partial, item)
                bw_ap, bw_dense, bw_sdpa = gbps(nbytes, ap_us), gbps(dense_bytes, dense_us), gbps(dense_bytes, sdpa_us)
                row = dict(
                    base_row, rank=rank, partial=partial, need_probs=partial, status="ok",
                    compressed_len=ap.compressed_len, window_len=ap.window_len,
                    group0_fraction=float((ap.flags // 2 == 0).float().mean()),
                    ap_us=ap_us, dense_triton_us=dense_us, sdpa_us=sdpa_us,
                    speedup_dense_triton_over_ap=dense_us / ap_us, speedup_sdpa_over_ap=sdpa_us / ap_us,
                    ap_bytes=nbytes, dense_triton_bytes=dense_bytes, sdpa_bytes=dense_bytes,
                    ap_gbps=bw_ap, dense_triton_gbps=bw_dense, sdpa_gbps=bw_sdpa,
                    ap_peak_pct=pct(bw_ap), dense_triton_peak_pct=pct(bw_dense), sdpa_peak_pct=pct(bw_sdpa),
                    ap_max_err=ap_err, ap_check_ok=ap_ok,
                    dense_vs_sdpa_max_err=dense_err, dense_check_ok=dense_ok)
                rows.append(row)
                print(f"{geom.name} batch {batch} ctx {context} rank {rank} partial {'on ' if partial else 'off'}"
                      f" | AP {ap_us:.1f}us dense-Triton {dense_us:.1f}us SDPA {sdpa_us:.1f}us"
                      f" | dense/AP {dense_us / ap_us:.2f}x SDPA/AP {sdpa_us / ap_us:.2f}x"
                      f" | bytes AP {fmt_bytes(nbytes)} dense-Triton {fmt_bytes(dense_bytes)} SDPA {fmt_bytes(dense_bytes)}"
                      f" | GB/s AP {bw_ap:.0f}{pct_str(bw_ap)} dense-Triton {bw_dense:.0f}{pct_str(bw_dense)}"
                      f" SDPA {bw_sdpa:.0f}{pct_str(bw_sdpa)}", flush=True)
                if ap_ok is False:
                    print(f"WARNING {where} rank {rank}: AP differs from the PyTorch latent path "
                          f"(max abs err {ap_err:.3g})", flush=True)
            del ap
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del query, seq_lens
        save(False)

    header["target"] = report_target(rows, args.smoke)
    save(True)
    print(f"saved {json_path}", flush=True)
    try:
        plot(rows, png_path, card, args.smoke)
        print(f"saved {png_path}", flush=True)
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
    if args.smoke:
        print("SMOKE RUN done: the numbers above are NOT timings of anything meaningful.", flush=True)
    return 0


def report_target(rows: list[dict], smoke: bool) -> list[dict]:
    """Print whether AP is >= 5x faster than dense-Triton at the issue's configuration."""
    found = [r for r in rows if r.get("status") == "ok"
             and all(r[key] == value for key, value in TARGET.items())]
    what = (f"{TARGET['geometry']} batch {TARGET['batch']} context {TARGET['context']} "
            f"rank {TARGET['rank']}")
    if not found:
        reason = "smoke run" if smoke else "configuration not in this run"
        print(f"TARGET ({what}, AP >= {TARGET_SPEEDUP:g}x faster than dense-Triton): not measured ({reason})",
              flush=True)
        return []
    out = []
    for r in found:
        speedup = r["speedup_dense_triton_over_ap"]
        met = speedup >= TARGET_SPEEDUP
        print(f"TARGET ({what}, partial {'on' if r['partial'] else 'off'}): AP {r['ap_us']:.1f}us vs "
              f"dense-Triton {r['dense_triton_us']:.1f}us = {speedup:.2f}x -> AP is "
              f"{'' if met else 'NOT '}at least {TARGET_SPEEDUP:g}x faster", flush=True)
        out.append(dict(partial=r["partial"], speedup=speedup, met=met))
    return out


def plot(rows: list[dict], path: Path, card: str, smoke: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    geoms = list(dict.fromkeys(r["geometry"] for r in ok)) or ["(none)"]
    ranks = sorted({r["rank"] for r in ok})
    rank = 64 if 64 in ranks else (ranks[0] if ranks else 64)
    fig, axes = plt.subplots(2, len(geoms), figsize=(5.5 * len(geoms), 8), squeeze=False)
    for col, geom in enumerate(geoms):
        for line, partial in enumerate((False, True)):
            ax = axes[line][col]
            sel = [r for r in ok if r["geometry"] == geom and r["rank"] == rank and r["partial"] == partial]
            for context in sorted({r["context"] for r in sel}):
                pts = sorted((r["batch"], r["speedup_dense_triton_over_ap"]) for r in sel if r["context"] == context)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"context {context}")
            ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
            if geom == TARGET["geometry"]:
                ax.axhline(TARGET_SPEEDUP, color="red", linestyle="--", linewidth=1,
                           label=f"{TARGET_SPEEDUP:g}x target")
            batches = sorted({r["batch"] for r in sel})
            if batches:
                ax.set_xscale("log", base=2)
                ax.set_xticks(batches)
                ax.set_xticklabels([str(b) for b in batches])
                ax.legend(fontsize=8)
            ax.set_title(f"{geom}, rank {rank}, partial rank {'on' if partial else 'off'}", fontsize=10)
            ax.set_xlabel("batch")
            ax.set_ylabel("speedup: dense-Triton time / AP time")
            ax.grid(True, alpha=0.3)
    title = f"AttentionPack decode vs dense paged Triton, {card}"
    if smoke:
        title += "\nSMOKE RUN (CPU, Triton interpreter): numbers meaningless"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
