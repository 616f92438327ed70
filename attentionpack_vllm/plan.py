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
class RequestTokens:
    """The most tokens of each modality one request can hold (None: no bound known).

    A basis never has more directions than its modality has tokens, so a plane's rank
    past that bound would be rows that stay zero in every slot (`CompressionPlan.build`
    clamps to it). vLLM bounds both: text by `max_model_len`, images by the model's
    tokens per item times the items allowed per prompt (`token_bounds.request_tokens`).
    """

    text: int | None = None
    image: int | None = None

    def clamp(self, rank: int, modality: int) -> int:
        bound = self.text if modality == TEXT else self.image
        return rank if bound is None else min(rank, bound)


@dataclass(frozen=True)
class CompressionPlan:
    num_kv_heads: int
    head_size: int
    ranks_k: tuple[int, int]   # (text, image) key ranks, clamped to kv_width and a request's tokens
    ranks_v: tuple[int, int]   # (text, image) value ranks, likewise
    record_ranks: tuple[int, int]  # (K', V') columns of a record: the largest configured ranks
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
              has_image: bool = True, request_tokens: RequestTokens = RequestTokens()) -> "CompressionPlan":
        """The plan of a layer with this KV geometry. Each modality's ranks are clamped to
        the most tokens of it a request can hold (`request_tokens`); the partial-rank
        groups read the columns they would at the configured rank, up to the clamped one,
        so clamping changes no result, only the rows a slot allocates."""
        ranks = config.effective_ranks(num_kv_heads * head_size)
        configured_k = _by_modality(text=ranks["rank_text_key"], image=ranks["rank_vision_key"])
        configured_v = _by_modality(text=ranks["rank_text_value"], image=ranks["rank_vision_value"])
        ranks_k, ranks_v = (tuple(request_tokens.clamp(r, m) for m, r in enumerate(configured))
                            for configured in (configured_k, configured_v))
        groups = lambda configured, ranks, partial: tuple(  # noqa: E731
            tuple(min(c, rank) for c in config.group_ranks(r, partial)) for r, rank in zip(configured, ranks))
        return cls(
            num_kv_heads=num_kv_heads,
            head_size=head_size,
            ranks_k=ranks_k,
            ranks_v=ranks_v,
            record_ranks=(max(configured_k), max(configured_v)),
            group_cols_k=groups(configured_k, ranks_k, config.partial_rank_keys),
            group_cols_v=groups(configured_v, ranks_v, config.partial_rank_values),
            group_fractions=config.group_fractions,
            ema_weight=config.ema_weight,
            window_size=config.window_size,
            svd=SvdSettings(config.svd, config.svd_oversample, config.svd_power_iters),
            has_image=has_image and request_tokens.image != 0,
            sink_tokens=config.sink_tokens,
            int8=config.storage == "int8",
            text_energy=None if config.rank_text_energy >= 1.0 else float(config.rank_text_energy),
        )

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_size

    @property
    def layout(self) -> RecordLayout:
        """Records as wide as the largest configured rank: a layer's page width depends on the
        settings and KV geometry only (vLLM sizes pages where no model bounds are known)."""
        return RecordLayout(rank_k=self.record_ranks[0], rank_v=self.record_ranks[1], int8=self.int8)

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
