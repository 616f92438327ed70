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
    slot_bytes: int           # one request's slot at full rank (bases + window + window scores), one layer
    pool_spare_bytes: int = 0  # one layer's pool beyond its slots (`SlotPool.spare_bytes`: the zero row)
    row_bytes: int = 0        # one arena row (a basis or exact row), one layer
    slot_fixed_bytes: int = 0  # what a slot holds beside the arena (window scores), one layer

    @classmethod
    def of(cls, plan: CompressionPlan, dtype: torch.dtype) -> "MemoryReport":
        item = dtype_bytes(dtype)
        return cls(dense_token_bytes=2 * plan.kv_width * item,
                   record_bytes=plan.layout.width * dtype_bytes(plan.page_dtype(dtype)),
                   slot_bytes=SlotPool.slot_bytes(plan, dtype),
                   pool_spare_bytes=SlotPool.spare_bytes(plan, dtype),
                   row_bytes=SlotPool.row_bytes(plan, dtype),
                   slot_fixed_bytes=SlotPool.slot_fixed_bytes(plan))

    def request_rows_bytes(self, rows: int, num_layers: int = 1) -> int:
        """Bytes of `rows` arena rows plus a slot's window scores over `num_layers`."""
        return (rows * self.row_bytes + self.slot_fixed_bytes) * num_layers

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
class RowPoolSizing:
    """How many arena rows a worker's KV cache budget lets the requests' bases and exact
    rows take (`row_pool`): rows for every slot at full rank, or fewer where those would
    take more than `max_fraction` of the budget. A request holds only the rows it uses,
    and the scheduler admits it only while they fit, so a capped pool lowers how many
    large requests run at once, not `max_num_seqs`."""

    slots: int            # max_num_seqs
    full_rows: int        # one request's rows at full rank with a full window
    row_bytes: int        # one arena row, all layers of one worker
    slot_bytes: int       # what every slot holds beside the arena (window scores), all layers
    budget_bytes: int     # the worker's KV cache budget
    max_fraction: float   # most of the budget the pools may take
    rows: int             # arena rows requests may hold (the zero row not counted)

    @property
    def capped(self) -> bool:
        return self.rows < self.slots * self.full_rows

    @property
    def full_requests(self) -> int:
        """Requests at full rank with a full window the rows hold at once."""
        return self.rows // self.full_rows

    @property
    def pool_bytes(self) -> int:
        """Bytes of the pools (arena with its zero row, every slot's window scores), all layers."""
        return (self.rows + 1) * self.row_bytes + self.slots * self.slot_bytes

    @property
    def uncapped_pool_bytes(self) -> int:
        return (self.slots * self.full_rows + 1) * self.row_bytes + self.slots * self.slot_bytes


def size_row_pool(slots: int, full_rows: int, row_bytes: int, slot_bytes: int, budget_bytes: int,
                  max_fraction: float) -> RowPoolSizing:
    """Rows for every slot at full rank, capped at `max_fraction` of the budget (never fewer
    than one request's full rows). Raises ValueError when one request's full rows do not
    fit the whole budget: no request could run."""
    if min(slots, full_rows, row_bytes, budget_bytes) < 1 or slot_bytes < 0:
        raise ValueError(f"slots ({slots}), rows per request ({full_rows}), bytes per row ({row_bytes}) and "
                         f"the budget ({budget_bytes}) must all be positive")
    if not 0.0 < max_fraction <= 1.0:
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
    one = (full_rows + 1) * row_bytes + slots * slot_bytes
    if one >= budget_bytes:
        raise ValueError(
            f"one AttentionPack request's bases and window at full rank ({full_rows} rows of {row_bytes} "
            f"bytes over all layers, {one} bytes with the arena's zero row and {slots} slots' window "
            f"scores) do not fit the KV cache budget ({budget_bytes} bytes): raise the budget or lower "
            "the ranks, window_size, sink_tokens or max_num_seqs")
    allowed = (math.floor(budget_bytes * max_fraction) - slots * slot_bytes) // row_bytes - 1
    rows = max(full_rows, min(slots * full_rows, allowed))
    return RowPoolSizing(slots=slots, full_rows=full_rows, row_bytes=row_bytes, slot_bytes=slot_bytes,
                         budget_bytes=budget_bytes, max_fraction=max_fraction, rows=rows)
