"""Memory against perplexity: every setting `quality.py` has measured, in one picture.

Reads the full-mode runs in benchmarks/results (the settings sweep `quality.json`, the
storage sweep `quality_storage.json`, the rank-policy sweep `quality_policy.json`; all
SmolLM2-135M-Instruct, the same 1,024-token prompt and 512 scored tokens), and sets
every row's perplexity (relative to dense in its own run) against its KV bytes for one
1,024-token request in a bfloat16 deployment. Bytes are recomputed from each row's
settings with the settings that were the defaults in its run (recorded in the file),
so a row keeps its meaning whatever today's defaults are.

    python benchmarks/quality_memory.py

Writes benchmarks/results/quality_memory.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from attentionpack_vllm.config import RANK_KEYS, AttentionPackConfig
from quality import MEMORY_TOKENS as TOKENS, MIB, NUM_LAYERS, RESULTS, Setting

SOURCES = ("quality.json", "quality_storage.json", "quality_policy.json")
# The settings every point on a rank line has (the defaults of every run but the rank).
PLAIN = {"window_size": 64, "sink_tokens": 4, "partial_rank_values": False, "partial_rank_keys": False,
         "rank_text_energy": 1.0}


def kv_mib(settings: dict | None, fp8: bool = False) -> float:
    """KV MiB of one TOKENS-token request in a bfloat16 model (fp8 dense: a byte an element)."""
    return Setting("", settings, fp8=fp8).kv_bytes(torch.bfloat16) / MIB


def settings_of(row: dict, defaults_then: dict) -> dict | None:
    """A row's full settings: its overrides over its run's defaults (16-bit storage where
    the run predates the `storage` setting)."""
    if row["attentionpack"] is None:
        return None
    overrides = row["attentionpack"]
    # Settings of that run that still exist; `rank` overrides the four ranks it stands for.
    dropped = set(RANK_KEYS) if "rank" in overrides else set()
    known = set(AttentionPackConfig.__dataclass_fields__) - dropped
    base = {"storage": "auto", **{k: v for k, v in defaults_then.items() if k in known}}
    settings = {**base, **overrides}
    rank = settings.pop("rank", None)
    return settings if rank is None else {**{k: rank for k in RANK_KEYS}, **settings}


def points(results: Path) -> list[dict]:
    """One point per measured row, dense rows included, from every source file present."""
    out, today = [], AttentionPackConfig().to_dict()
    for name in SOURCES:
        path = results / name
        if not path.exists():
            continue
        run = json.loads(path.read_text())
        ppl = run["perplexity"]
        dense_ppl = ppl["dense"]["perplexity"]
        defaults_then = run["settings"]["defaults"]
        rows = [{"setting": "dense", "attentionpack": None, "perplexity": dense_ppl}] + ppl["settings"]
        for row in rows:
            settings = settings_of(row, defaults_then)
            fp8 = bool(row.get("dense_fp8"))
            out.append({
                "source": name, "setting": row["setting"], "settings": settings, "dense_fp8": fp8,
                "prefill_chunk": row.get("prefill_chunk"),
                "storage": None if settings is None else settings["storage"],
                "kv_mib_bf16": kv_mib(settings, fp8), "perplexity": row["perplexity"],
                "ppl_ratio_to_dense": row["perplexity"] / dense_ppl,
                "next_token_agreement": row.get("next_token_agreement", 1.0),
                "is_today_default": settings is not None and not row.get("prefill_chunk")
                and all(settings.get(k) == v for k, v in today.items()),
            })
    return out


def plot(pts: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (the axis formatters)

    fig, ax = plt.subplots(figsize=(9, 6))
    # A rank line's points change only the rank (and storage) from the rest of the defaults
    # (a setting missing from an older run did not exist yet: it was off).
    is_rank_only = lambda p: (p["settings"] is not None and not p["prefill_chunk"]  # noqa: E731
                              and all(p["settings"].get(k, v) == v for k, v in PLAIN.items()))
    for storage, style, color, label in (("auto", "o-", "tab:blue", "AttentionPack, 16-bit storage, by rank"),
                                         ("int8", "s--", "tab:orange", "AttentionPack, int8 storage, by rank")):
        line = {}
        for p in pts:
            if is_rank_only(p) and p["storage"] == storage:
                line.setdefault(p["settings"]["rank_text_key"], p)  # the first run of a rank names it
        line = sorted(line.values(), key=lambda p: p["kv_mib_bf16"])
        ax.plot([p["kv_mib_bf16"] for p in line], [p["ppl_ratio_to_dense"] for p in line], style,
                color=color, label=label)
        for p in line:
            rank = p["settings"]["rank_text_key"]
            ax.annotate(f"r{rank}" if rank < 192 else "full",
                        (p["kv_mib_bf16"], p["ppl_ratio_to_dense"]), textcoords="offset points",
                        xytext=(4, 4 if storage == "auto" else -11), fontsize=8, color=color)
    others = [p for p in pts if p["settings"] is not None and not is_rank_only(p)]
    for p in others:
        ax.plot([p["kv_mib_bf16"]], [p["ppl_ratio_to_dense"]], "^" if p["storage"] == "int8" else "v",
                color="tab:orange" if p["storage"] == "int8" else "tab:blue", alpha=0.55, markersize=5)
        ax.annotate(p["setting"], (p["kv_mib_bf16"], p["ppl_ratio_to_dense"]), textcoords="offset points",
                    xytext=(4, 0), fontsize=6, color="0.35")
    dense = next(p for p in pts if p["settings"] is None and not p["dense_fp8"])
    ax.plot([dense["kv_mib_bf16"]], [1.0], "k*", markersize=14, label="dense (vLLM, bf16)")
    fp8 = next((p for p in pts if p["dense_fp8"]), None)
    if fp8:
        ax.plot([fp8["kv_mib_bf16"]], [fp8["ppl_ratio_to_dense"]], "kD", markersize=7, label="dense fp8 (vLLM)")
    default = next((p for p in pts if p["is_today_default"]), None)
    if default:
        ax.plot([default["kv_mib_bf16"]], [default["ppl_ratio_to_dense"]], "o", markersize=16,
                markerfacecolor="none", markeredgecolor="red", markeredgewidth=2, label="defaults (rank 80, int8)")
    ax.axhline(1.0, color="k", lw=0.7, ls=":")
    ax.axhline(1.15, color="red", lw=0.7, ls=":", label="perplexity goal (1.15x dense)")
    ax.axvline(dense["kv_mib_bf16"] / 2, color="red", lw=0.7, ls="--", label="memory goal (2x smaller than dense)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([3, 4, 6, 8, 10, 15, 20, 30])
    ax.set_ylim(0.95, 2.0)
    ax.set_xlabel(f"KV MiB per {TOKENS}-token request ({NUM_LAYERS} layers, bfloat16 model)")
    ax.set_ylabel("perplexity / dense perplexity")
    ax.set_title("SmolLM2-135M-Instruct: every measured setting, memory against perplexity", fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the quality runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="output stem (default: RESULTS/quality_memory)")
    args = parser.parse_args(argv)
    pts = points(args.results)
    if not pts:
        parser.error(f"--results: none of {list(SOURCES)} in {args.results}")
    stem = args.out or args.results / "quality_memory"
    result = {"command": shlex.join(["python", "benchmarks/quality_memory.py", *(argv or sys.argv[1:])]),
              "sources": [s for s in SOURCES if (args.results / s).exists()],
              "request": {"tokens": TOKENS, "layers": NUM_LAYERS, "dtype": "bfloat16"}, "points": pts}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(pts, stem.with_suffix(".png"))
    for p in pts:
        print(f"{p['source']:22} {p['setting']:24} {p['kv_mib_bf16']:7.2f} MiB  {p['ppl_ratio_to_dense']:.3f}x"
              + ("  (defaults)" if p["is_today_default"] else ""))
    print(f"saved {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
