"""Per-request state beside the pages: bases and the full-rank window, one slot per request.

One pool per layer, allocated once. A slot holds, for its request, the key and value
bases of each modality the plan has (text only, or text and image, each plane only as
many rows as its own rank) and its exact rows at full precision: the sink tokens (the
request's first `sink_tokens`), then the window of newest decode tokens, with those
tokens' importance scores. How many exact rows are valid is host-side state
(`windows.WindowTracker`), the same for every layer. `reset` clears everything a
previous request left.

The rows live in one arena per layer (`kernels/slot_rows.py`): maps, shared by the
layers, name the arena row of each (slot, plane, row) and (slot, exact row). `read` and
`write` take those logical indices, so callers never see where a row is stored.

With int8 storage (`plan.int8`) the rows are int8 with one float32 scale per row and KV
head; `read` and `write` convert, so callers never see the format either.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels.slot_rows import MAP_NAMES, ZERO_ROW, SlotRows, read_arena, slot_major_maps
from .kernels.storage import quantize, take_rows
from .plan import CompressionPlan
from .row_pool import full_request_rows


@dataclass
class SlotPool:
    rows: SlotRows                    # the layer's arena and the (shared) maps into it
    window_importance: torch.Tensor   # [num_slots, exact_rows] float32

    @classmethod
    def allocate(cls, plan: CompressionPlan, num_slots: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", maps: "SlotMaps | None" = None) -> "SlotPool":
        """A zeroed pool; `maps` (`slot_pool_maps`) may be shared by the layers of a plan."""
        num_rows, index = maps if maps is not None else slot_pool_maps(plan, num_slots, device)
        arena = torch.zeros(num_rows, plan.kv_width, dtype=torch.int8 if plan.int8 else dtype, device=device)
        scales = (torch.zeros(num_rows, plan.num_kv_heads, dtype=torch.float32, device=device)
                  if plan.int8 else None)
        return cls(rows=SlotRows(arena, scales, **index),
                   window_importance=torch.zeros(num_slots, plan.exact_rows, dtype=torch.float32,
                                                 device=device))

    @property
    def num_slots(self) -> int:
        return self.rows.num_slots

    @property
    def scales(self) -> torch.Tensor | None:
        return self.rows.scales

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors this layer owns (the maps are shared)."""
        own = (self.rows.arena, self.window_importance)
        return own if self.rows.scales is None else (*own, self.rows.scales)

    def nbytes(self) -> int:
        """Bytes this layer's pool allocated (arena with its zero row, scales, window scores)."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors())

    def arena_rows(self, name: str, index) -> torch.Tensor:
        """The arena rows of logical rows `getattr(maps, name)[index]` (`name` in MAP_NAMES)."""
        return _read_rows(self.rows.map(name), index)

    def read(self, name: str, index) -> torch.Tensor:
        """Rows `name[index]` as float32 (`index` selects whole logical rows: slots, then
        planes and rows)."""
        return read_arena(self.rows, self.arena_rows(name, index))

    def write(self, name: str, index, rows: torch.Tensor) -> None:
        """Store float rows [..., kv_width] at `name[index]`. Logical rows with no arena row of
        their own (on the zero row: a basis plane's rows past what its request holds) take
        nothing: a basis never has more directions than tokens, so those rows are zero."""
        self._store(self.arena_rows(name, index), rows)
        self.rows.arena[ZERO_ROW] = 0
        if self.rows.scales is not None:
            self.rows.scales[ZERO_ROW] = 0

    def write_window(self, index, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store float key and value rows [..., kv_width] at `window_k[index]` and
        `window_v[index]` (int8: one quantize for both, the decode step's append)."""
        at = torch.stack([self.arena_rows("window_k", index), self.arena_rows("window_v", index)])
        self._store(at, torch.stack([keys, values]))

    def clear_rows(self, at: torch.Tensor) -> None:
        """Zero arena rows `at` ([N] int64; rows a request was just handed)."""
        self.rows.arena.index_fill_(0, at, 0)
        if self.rows.scales is not None:
            self.rows.scales.index_fill_(0, at, 0)

    def _store(self, at: torch.Tensor, rows: torch.Tensor) -> None:
        arena, scales = self.rows.arena, self.rows.scales
        at = at.reshape(-1)
        rows = rows.reshape(-1, arena.shape[-1])
        if scales is None:
            arena.index_copy_(0, at, rows.to(arena.dtype))
            return
        q, s = quantize(rows, scales.shape[-1])
        arena.index_copy_(0, at, q)
        scales.index_copy_(0, at, s)

    @staticmethod
    def slot_bytes(plan: CompressionPlan, dtype: torch.dtype) -> int:
        """Bytes of one slot (what `allocate` takes per slot)."""
        return full_request_rows(plan) * _row_bytes(plan, dtype) + SlotPool.slot_fixed_bytes(plan)

    @staticmethod
    def row_bytes(plan: CompressionPlan, dtype: torch.dtype) -> int:
        """Bytes of one arena row (with its scales in int8 storage)."""
        return _row_bytes(plan, dtype)

    @staticmethod
    def slot_fixed_bytes(plan: CompressionPlan) -> int:
        """Bytes every slot holds beside the arena: its exact rows' importance scores."""
        return plan.exact_rows * 4

    @staticmethod
    def spare_bytes(plan: CompressionPlan, dtype: torch.dtype) -> int:
        """Bytes a pool holds beyond its slots: the arena's zero row."""
        return _row_bytes(plan, dtype)

    def reset(self, slot: int) -> None:
        """Forget everything about the slot's previous request: zero its rows and window scores."""
        # (the slot's unheld rows name the zero row, which zeroing leaves as it is)
        self.clear_rows(torch.cat([self.rows.map(name)[slot].reshape(-1) for name in MAP_NAMES]))
        self.window_importance[slot] = 0


SlotMaps = tuple[int, dict[str, torch.Tensor]]  # (arena rows, maps by name)


def slot_pool_maps(plan: CompressionPlan, num_slots: int, device: torch.device | str = "cpu") -> SlotMaps:
    """Slot-major maps for `plan` (`kernels.slot_rows.slot_major_maps`): each plane only its
    own rank's rows, the rest on the zero row."""
    layout, planes = plan.layout, plan.num_modalities
    return slot_major_maps(num_slots, plan.ranks_k[:planes], plan.ranks_v[:planes], layout.rank_k,
                           layout.rank_v, plan.exact_rows, device)


def _row_bytes(plan: CompressionPlan, dtype: torch.dtype) -> int:
    """Bytes of one basis or exact row: kv_width elements, plus one float32 scale per KV
    head with int8 storage."""
    if plan.int8:
        return plan.kv_width + plan.num_kv_heads * 4
    return plan.kv_width * torch.empty((), dtype=dtype).element_size()


def _read_rows(t: torch.Tensor, index) -> torch.Tensor:
    """t[index]; an index that starts with a tensor of slots and goes on with plain
    indices or slices reads the slots through `take_rows` (fast on CPU) first."""
    if isinstance(index, torch.Tensor):
        return take_rows(t, index)
    if (isinstance(index, tuple) and isinstance(index[0], torch.Tensor)
            and not any(isinstance(i, torch.Tensor) for i in index[1:])):
        return take_rows(t, index[0])[(slice(None),) * index[0].dim() + index[1:]]
    return t[index]
