"""Byte accounting, per token and per request, against vLLM's dense cache.

Dense: every token of every layer stores K and V, `2 * num_kv_heads * head_size`
elements. AttentionPack: every token stores one record (`layout.width` elements)
and every request holds one slot per layer (bases of each modality the model has
and the full-rank window). Both parts are reported; the fixed part dominates short requests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .plan import CompressionPlan
from .slot_pool import SlotPool


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


@dataclass(frozen=True)
class MemoryReport:
    """Per-layer figures for one plan and cache dtype."""

    dense_token_bytes: int    # K and V of one token, one layer
    record_bytes: int         # one AttentionPack record, one layer
    slot_bytes: int           # one request's slot (bases + window + window scores), one layer
    pool_spare_bytes: int = 0  # one layer's pool beyond its slots (`SlotPool.spare_bytes`)

    @classmethod
    def of(cls, plan: CompressionPlan, dtype: torch.dtype) -> "MemoryReport":
        item = dtype_bytes(dtype)
        return cls(dense_token_bytes=2 * plan.kv_width * item,
                   record_bytes=plan.layout.width * dtype_bytes(plan.page_dtype(dtype)),
                   slot_bytes=SlotPool.slot_bytes(plan, dtype),
                   pool_spare_bytes=SlotPool.spare_bytes(plan, dtype))

    @property
    def token_ratio(self) -> float:
        """How many AttentionPack tokens fit in the bytes of one dense token."""
        return self.dense_token_bytes / self.record_bytes

    def request_bytes(self, num_tokens: int, num_layers: int = 1) -> tuple[int, int]:
        """(dense, attentionpack) bytes of one request of `num_tokens` over `num_layers`."""
        dense = num_tokens * self.dense_token_bytes * num_layers
        packed = (num_tokens * self.record_bytes + self.slot_bytes) * num_layers
        return dense, packed

    def crossover_tokens(self) -> int | None:
        """Smallest request length at which AttentionPack uses fewer bytes than dense
        (None when a record is not smaller than a dense token: it never pays)."""
        saved_per_token = self.dense_token_bytes - self.record_bytes
        if saved_per_token <= 0:
            return None
        return math.floor(self.slot_bytes / saved_per_token) + 1

    def cache_tokens(self, budget_bytes: int, num_layers: int, block_size: int,
                     num_slots: int) -> tuple[int, int]:
        """(dense, attentionpack) tokens a KV budget pages in whole blocks; AttentionPack's
        `num_slots` slot pools come out of the budget first."""
        dense_blocks = budget_bytes // (self.dense_token_bytes * num_layers * block_size)
        records = budget_bytes - (self.slot_bytes * num_slots + self.pool_spare_bytes) * num_layers
        packed_blocks = max(records, 0) // (self.record_bytes * num_layers * block_size)
        return dense_blocks * block_size, packed_blocks * block_size


@dataclass(frozen=True)
class SlotSizing:
    """How many request slots a worker's KV cache budget lets the engine keep.

    Every layer preallocates one slot per request the scheduler may run at once
    (`max_num_seqs`); those pools must leave most of the budget to the pages."""

    requested: int        # max_num_seqs asked for
    kept: int             # max_num_seqs to run with
    slot_bytes: int       # one request's slots over all layers of one worker
    budget_bytes: int     # the worker's KV cache budget
    max_fraction: float   # most of the budget the pools may take

    @property
    def lowered(self) -> bool:
        return self.kept < self.requested

    @property
    def pool_bytes(self) -> int:
        """Bytes of the slot pools kept (all layers of one worker)."""
        return self.kept * self.slot_bytes

    @property
    def requested_pool_bytes(self) -> int:
        return self.requested * self.slot_bytes


def size_request_slots(requested: int, slot_bytes: int, budget_bytes: int,
                       max_fraction: float) -> SlotSizing:
    """Keep as many of the `requested` slots as fit in `max_fraction` of the budget
    (never fewer than one). Raises ValueError when one slot alone does not fit the
    whole budget: no number of requests can run."""
    if requested < 1 or slot_bytes < 1 or budget_bytes < 1:
        raise ValueError(f"requested slots ({requested}), bytes per slot ({slot_bytes}) and "
                         f"the budget ({budget_bytes}) must all be positive")
    if not 0.0 < max_fraction <= 1.0:
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
    if slot_bytes >= budget_bytes:
        raise ValueError(
            f"one AttentionPack request slot ({slot_bytes} bytes over all layers) does not fit "
            f"the KV cache budget ({budget_bytes} bytes): raise the budget or lower the ranks, "
            "window_size or sink_tokens")
    allowed = math.floor(budget_bytes * max_fraction) // slot_bytes
    kept = max(1, min(requested, allowed))
    return SlotSizing(requested=requested, kept=kept, slot_bytes=slot_bytes,
                      budget_bytes=budget_bytes, max_fraction=max_fraction)
