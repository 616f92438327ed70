"""A layer's compression plan: the settings resolved against its KV geometry.

Built once per layer shape from `AttentionPackConfig`; every storage and attention
function reads ranks, record layout and partial-rank columns from here.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .config import AttentionPackConfig
from .factorize import SvdSettings
from .kernels.decode_inputs import LatentSpec
from .kernels.layout import IMAGE, TEXT, RecordLayout


@dataclass(frozen=True)
class CompressionPlan:
    num_kv_heads: int
    head_size: int
    ranks_k: tuple[int, int]   # (text, image) key ranks, clamped to kv_width
    ranks_v: tuple[int, int]   # (text, image) value ranks, clamped to kv_width
    group_cols_k: tuple[tuple[int, ...], tuple[int, ...]]  # per modality, per group
    group_cols_v: tuple[tuple[int, ...], tuple[int, ...]]
    group_fractions: tuple[float, ...]
    ema_weight: float
    window_size: int
    svd: SvdSettings
    sink_tokens: int = 0       # first tokens of a request kept exact (the slot's first exact rows)
    has_image: bool = True     # slots hold image bases (a multimodal model)
    int8: bool = False         # records, bases and exact rows stored as int8 with scales
    text_energy: float | None = None  # text segments keep the directions capturing this share

    @classmethod
    def build(cls, config: AttentionPackConfig, num_kv_heads: int, head_size: int,
              has_image: bool = True) -> "CompressionPlan":
        ranks = config.effective_ranks(num_kv_heads * head_size)
        ranks_k = _by_modality(text=ranks["rank_text_key"], image=ranks["rank_vision_key"])
        ranks_v = _by_modality(text=ranks["rank_text_value"], image=ranks["rank_vision_value"])
        return cls(
            num_kv_heads=num_kv_heads,
            head_size=head_size,
            ranks_k=ranks_k,
            ranks_v=ranks_v,
            group_cols_k=tuple(config.group_ranks(r, config.partial_rank_keys) for r in ranks_k),
            group_cols_v=tuple(config.group_ranks(r, config.partial_rank_values) for r in ranks_v),
            group_fractions=config.group_fractions,
            ema_weight=config.ema_weight,
            window_size=config.window_size,
            svd=SvdSettings(config.svd, config.svd_oversample, config.svd_power_iters),
            has_image=has_image,
            sink_tokens=config.sink_tokens,
            int8=config.storage == "int8",
            text_energy=None if config.rank_text_energy >= 1.0 else float(config.rank_text_energy),
        )

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_size

    @property
    def layout(self) -> RecordLayout:
        return RecordLayout(rank_k=max(self.ranks_k), rank_v=max(self.ranks_v), int8=self.int8)

    def page_dtype(self, cache_dtype: torch.dtype) -> torch.dtype:
        """The dtype pages are read and written in: bytes with int8 storage, else the cache's."""
        return torch.int8 if self.int8 else cache_dtype

    @property
    def exact_rows(self) -> int:
        """Full-precision rows of a slot: the sinks, then the window."""
        return self.sink_tokens + self.window_size

    @property
    def num_modalities(self) -> int:
        """Planes of a slot's bases: text only, or text and image."""
        return 2 if self.has_image else 1

    @functools.cached_property
    def spec(self) -> LatentSpec:
        """The constants the latent-space decode branches on.

        A group that reads its modality's whole rank reads the whole record width in the
        spec (the columns past a modality's rank are zero), so a plan without partial rank
        has no column masks even when the modalities' ranks differ."""
        layout = self.layout
        widen = lambda table, ranks, width: tuple(  # noqa: E731
            tuple(width if c >= r else c for c in row) for row, r in zip(table, ranks))
        return LatentSpec(layout, self.num_modalities,
                          widen(self.group_cols_k, self.ranks_k, layout.rank_k),
                          widen(self.group_cols_v, self.ranks_v, layout.rank_v))

    @property
    def num_groups(self) -> int:
        return len(self.group_fractions)

    @property
    def tracks_importance(self) -> bool:
        """Whether any group reads fewer columns than the full rank (else grouping is moot)."""
        return self.spec.partial_k or self.spec.partial_v

    def group_cols_tensors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """[2, num_groups] int32 tensors of columns read per (modality, group) (the oracle's form)."""
        return (torch.tensor(self.group_cols_k, dtype=torch.int32, device=device),
                torch.tensor(self.group_cols_v, dtype=torch.int32, device=device))


def _by_modality(text: int, image: int) -> tuple[int, int]:
    pair = [0, 0]
    pair[TEXT], pair[IMAGE] = text, image
    return tuple(pair)
