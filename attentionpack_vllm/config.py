"""AttentionPack settings: one validated, immutable object built from a plain dict.

The dict is what `--additional-config '{"attentionpack": {...}}'` hands over. Every
invalid value raises `AttentionPackConfigError` naming the key, the value and what
is accepted. Defaults: rank 80 for every matrix and modality, int8 storage, the
first 4 tokens of each request and its newest 64 decode tokens kept exact, and
partial rank off (each measured with benchmarks/quality.py: rank 80 with int8 storage
keeps the long-context retrieval that rank 64 loses, in fewer bytes than rank 64 in
16 bits; partial rank costs next-token agreement and a per-step importance update).
Turned on, the groups are the paper's: top 25 % of tokens at full rank, the rest at a
quarter of the rank, values only, EMA weight 0.25.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

RANK_KEYS = ("rank_vision_key", "rank_vision_value", "rank_text_key", "rank_text_value")
SVD_METHODS = ("auto", "exact", "gram", "gram32", "randomized")  # factorize.METHODS
DECODE_KERNELS = ("auto", "torch", "triton", "cpu")
STORAGE_FORMATS = ("auto", "int8")


class AttentionPackConfigError(ValueError):
    """An AttentionPack setting has a value outside what is accepted."""

    def __init__(self, key: str, value: Any, accepted: str):
        self.key, self.value, self.accepted = key, value, accepted
        super().__init__(
            f"attentionpack setting {key!r} = {value!r} is invalid: expected {accepted}")


@dataclass(frozen=True)
class AttentionPackConfig:
    """Validated AttentionPack settings (see README's settings table).

    Ranks are upper bounds: a layer whose concatenated KV width (num_kv_heads *
    head_size) is smaller uses that width, and a segment with fewer tokens than
    its rank is stored exactly.
    """

    rank_vision_key: int = 80
    rank_vision_value: int = 80
    rank_text_key: int = 80
    rank_text_value: int = 80
    # Text ranks by captured energy: each text segment (per request, layer, K or V)
    # keeps the fewest leading directions that capture this share of its energy, at most
    # its rank above (the record width). 1.0 keeps the whole rank.
    rank_text_energy: float = 1.0
    # Partial rank: tokens ranked by importance fill the groups in order; group f
    # covers `group_fractions[f]` of the tokens and keeps `group_rank_scales[f]` of
    # the rank. The first group must keep the full rank.
    group_fractions: tuple[float, ...] = (0.25, 0.75)
    group_rank_scales: tuple[float, ...] = (1.0, 0.25)
    partial_rank_keys: bool = False
    partial_rank_values: bool = False
    # importance <- ema_weight * importance + (1 - ema_weight) * new_score
    ema_weight: float = 0.25
    # Newest decode tokens kept at full rank before they are folded into the text basis
    # (64: measured against 16 / 32 / 128 in benchmarks/quality.py).
    window_size: int = 64
    # First tokens of each request kept at full precision for its whole life (attention
    # sinks; 0 turns them off). They are never factorised.
    sink_tokens: int = 4
    # Factorisation method (see factorize.py): "auto" is "randomized" on CUDA (matrix
    # products and Cholesky only) and "gram32" on CPU (float32 Gram eigendecomposition);
    # "gram" is the same in float64 (as accurate as "exact"), "exact" torch.linalg.svd.
    svd: str = "auto"
    # Extra sketch columns and power iterations of the randomized range finder.
    svd_oversample: int = 16
    svd_power_iters: int = 2
    # Decode attention implementation: Triton on CUDA and the compiled CPU kernel on CPU
    # ("auto"; the PyTorch path where no C++ compiler is found), or forced: "torch",
    # "triton" (on CPU under TRITON_INTERPRET=1), "cpu" (refused without a compiler).
    decode_kernel: str = "auto"
    # Most of a worker's KV cache budget the per-request slot pools may take: when
    # max_num_seqs slots would take more, max_num_seqs is lowered at startup.
    max_pool_fraction: float = 0.5
    # How factors, bases and exact rows are stored: "int8" with float32 scales (one per
    # token's K' and V', one per slot row and KV head), or "auto": the model's dtype.
    storage: str = "int8"

    def __post_init__(self) -> None:
        for key in RANK_KEYS + ("window_size",):
            _check_int(key, getattr(self, key), minimum=1)
        for key in ("svd_oversample", "svd_power_iters", "sink_tokens"):
            _check_int(key, getattr(self, key), minimum=0)
        for key in ("partial_rank_keys", "partial_rank_values"):
            if not isinstance(getattr(self, key), bool):
                raise AttentionPackConfigError(key, getattr(self, key), "true or false")
        _check_groups(self.group_fractions, self.group_rank_scales)
        _check_number("ema_weight", self.ema_weight, "[0, 1)", lambda x: 0.0 <= x < 1.0)
        _check_number("rank_text_energy", self.rank_text_energy, "(0, 1]", lambda x: 0.0 < x <= 1.0)
        _check_number("max_pool_fraction", self.max_pool_fraction, "(0, 1)", lambda x: 0.0 < x < 1.0)
        if self.svd not in SVD_METHODS:
            raise AttentionPackConfigError("svd", self.svd, f"one of {list(SVD_METHODS)}")
        if self.storage not in STORAGE_FORMATS:
            raise AttentionPackConfigError("storage", self.storage, f"one of {list(STORAGE_FORMATS)}")
        if self.decode_kernel not in DECODE_KERNELS:
            raise AttentionPackConfigError(
                "decode_kernel", self.decode_kernel, f"one of {list(DECODE_KERNELS)}")

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any] | None) -> "AttentionPackConfig":
        """Build from a plain dict; `rank` is a shorthand that sets all four ranks."""
        if settings is None:
            return cls()
        if not isinstance(settings, Mapping):
            raise AttentionPackConfigError(
                "attentionpack", settings, "a JSON object of settings")
        values = dict(settings)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - {"rank"})
        if unknown:
            raise AttentionPackConfigError(
                unknown[0], values[unknown[0]], f"a known setting, one of {sorted(known | {'rank'})}")
        if "rank" in values:
            rank = values.pop("rank")
            for key in RANK_KEYS:
                values.setdefault(key, rank)
        for key in ("group_fractions", "group_rank_scales"):
            if key in values:
                if not isinstance(values[key], (list, tuple)):
                    raise AttentionPackConfigError(key, values[key], "a list of numbers")
                values[key] = tuple(values[key])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    @property
    def num_groups(self) -> int:
        return len(self.group_fractions)

    def effective_ranks(self, kv_width: int) -> dict[str, int]:
        """Ranks clamped to the concatenated KV width of a layer."""
        return {key: min(getattr(self, key), kv_width) for key in RANK_KEYS}

    def group_ranks(self, rank: int, partial: bool) -> tuple[int, ...]:
        """Columns each group reads out of `rank` (all of them when `partial` is off)."""
        if not partial:
            return (rank,) * self.num_groups
        return tuple(max(1, math.ceil(rank * scale)) for scale in self.group_rank_scales)


def _check_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AttentionPackConfigError(key, value, f"an integer >= {minimum}")


def _check_number(key: str, value: Any, interval: str, inside: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not inside(value):
        raise AttentionPackConfigError(key, value, f"a number in {interval}")


def _check_groups(fractions: tuple, scales: tuple) -> None:
    def numbers(key, values, lo, hi, lo_open):
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise AttentionPackConfigError(key, list(values), "a non-empty list of numbers")
        for v in values:
            if (v <= lo if lo_open else v < lo) or v > hi:
                bound = "(0, 1]" if lo_open else "[0, 1]"
                raise AttentionPackConfigError(key, list(values), f"numbers in {bound}")

    numbers("group_fractions", fractions, 0.0, 1.0, lo_open=False)
    numbers("group_rank_scales", scales, 0.0, 1.0, lo_open=True)
    if len(fractions) != len(scales):
        raise AttentionPackConfigError(
            "group_rank_scales", list(scales),
            f"one scale per group ({len(fractions)} groups in group_fractions)")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise AttentionPackConfigError("group_fractions", list(fractions), "fractions summing to 1")
    if scales[0] != 1.0:
        raise AttentionPackConfigError(
            "group_rank_scales", list(scales), "a list whose first scale is 1.0 (full rank)")
    if list(scales) != sorted(scales, reverse=True):
        raise AttentionPackConfigError(
            "group_rank_scales", list(scales), "scales in non-increasing order")
