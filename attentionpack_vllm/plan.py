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

    @classmethod
    def build(cls, config: AttentionPackConfig, num_kv_heads: int, head_size: int) -> "CompressionPlan":
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
        )

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_size

    @property
    def layout(self) -> RecordLayout:
        return RecordLayout(rank_k=max(self.ranks_k), rank_v=max(self.ranks_v))

    @property
    def num_groups(self) -> int:
        return len(self.group_fractions)

    @property
    def tracks_importance(self) -> bool:
        """Whether any group reads fewer columns than the full rank (else grouping is moot)."""
        full = (self.ranks_k, self.ranks_v)
        cols = (self.group_cols_k, self.group_cols_v)
        return any(c < r for ranks, groups in zip(full, cols) for r, g in zip(ranks, groups) for c in g)

    def group_cols_tensors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """[2, num_groups] int32 tensors of columns read per (modality, group).

        Made once per plan and device: the decode step asks for them in every layer."""
        return _group_cols_tensors(self, str(torch.device(device or "cpu")))


@functools.cache
def _group_cols_tensors(plan: CompressionPlan, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(plan.group_cols_k, dtype=torch.int32, device=device),
            torch.tensor(plan.group_cols_v, dtype=torch.int32, device=device))


def _by_modality(text: int, image: int) -> tuple[int, int]:
    pair = [0, 0]
    pair[TEXT], pair[IMAGE] = text, image
    return tuple(pair)
