"""A layer's per-request rows in one row arena, and the maps saying which arena row holds each.

Every request slot has logical rows of kv_width elements (KV heads concatenated):
for each plane m (TEXT, then IMAGE when the plan has images) rank_k key-basis rows and
rank_v value-basis rows, and exact_rows key and value rows (the sinks, then the window).
They are stored in one arena per layer; `basis_k[slot, m, r]`, `basis_v[slot, m, r]`,
`window_k[slot, w]` and `window_v[slot, w]` name the arena row of each logical row.

Arena row 0 is all zero and never written. A logical row with no storage of its own
maps there (a plane's rows past its own rank, when the record is wider), so reading it
gives the zeros a zero-padded basis would hold. The maps are the same for every layer
of a plan, so the layers share one set.

Every reader (the PyTorch path, the CPU kernel, the Triton kernel, the folds and
prefill through `SlotPool`) goes through the maps; none assumes a slot's rows are
adjacent. `slot_major_maps` lays each slot's rows out together, `slot_major_rows`
packs slot-major tensors (tests, benchmarks) into that form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .storage import dequantize

MAP_NAMES = ("basis_k", "basis_v", "window_k", "window_v")
ZERO_ROW = 0


@dataclass
class SlotRows:
    """The arena of one layer and the maps into it (int64 arena rows)."""

    arena: torch.Tensor              # [num_rows, kv_width], model dtype or int8; row 0 all zero
    scales: torch.Tensor | None      # [num_rows, kv_heads] float32 with int8 storage, else None
    basis_k: torch.Tensor            # [num_slots, M, rank_k]
    basis_v: torch.Tensor            # [num_slots, M, rank_v]
    window_k: torch.Tensor           # [num_slots, exact_rows]
    window_v: torch.Tensor           # [num_slots, exact_rows]

    @property
    def num_slots(self) -> int:
        return self.basis_k.shape[0]

    @property
    def kv_width(self) -> int:
        return self.arena.shape[-1]

    def map(self, name: str) -> torch.Tensor:
        """The map of `name` (one of MAP_NAMES)."""
        if name not in MAP_NAMES:
            raise KeyError(f"slot rows are named {MAP_NAMES}, not {name!r}")
        return getattr(self, name)

    def with_arena(self, arena: torch.Tensor, scales: torch.Tensor | None) -> "SlotRows":
        """The same maps over another layer's arena."""
        return SlotRows(arena, scales, self.basis_k, self.basis_v, self.window_k, self.window_v)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The arena, its scales where present, and the maps."""
        scales = () if self.scales is None else (self.scales,)
        return (self.arena, *scales, *(self.map(name) for name in MAP_NAMES))

    def map_tensors(self, fn) -> "SlotRows":
        """`fn` applied to every tensor (arena, scales where present, maps)."""
        return SlotRows(fn(self.arena), None if self.scales is None else fn(self.scales),
                        *(fn(self.map(name)) for name in MAP_NAMES))


def slot_major_maps(num_slots: int, ranks_k: Sequence[int], ranks_v: Sequence[int], rank_k: int, rank_v: int,
                    exact_rows: int, device: torch.device | str = "cpu") -> tuple[int, dict[str, torch.Tensor]]:
    """(arena rows, maps) with each slot's rows together: its key planes (each only its own
    rank's rows), its value planes, its exact key rows, its exact value rows; row 0 the
    zero row. `ranks_k`/`ranks_v`: each plane's own rank, at most the record's
    `rank_k`/`rank_v` (the maps' width)."""
    if any(r > rank_k for r in ranks_k) or any(r > rank_v for r in ranks_v):
        raise ValueError(f"a plane's rank exceeds the record's: {tuple(ranks_k)} > {rank_k} "
                         f"or {tuple(ranks_v)} > {rank_v}")
    per_slot = sum(ranks_k) + sum(ranks_v) + 2 * exact_rows
    first = ZERO_ROW + 1 + torch.arange(num_slots, dtype=torch.int64) * per_slot   # [S]

    def planes(ranks: Sequence[int], width: int, start: int) -> torch.Tensor:
        cols = torch.arange(width, dtype=torch.int64)
        out = []
        for rank in ranks:
            rows = first[:, None] + start + cols[None, :]
            out.append(torch.where(cols[None, :] < rank, rows, ZERO_ROW))
            start += rank
        return torch.stack(out, dim=1)

    maps = {"basis_k": planes(ranks_k, rank_k, 0), "basis_v": planes(ranks_v, rank_v, sum(ranks_k))}
    exact = torch.arange(exact_rows, dtype=torch.int64)[None, :]
    after_bases = sum(ranks_k) + sum(ranks_v)
    maps["window_k"] = first[:, None] + after_bases + exact
    maps["window_v"] = first[:, None] + after_bases + exact_rows + exact
    return 1 + num_slots * per_slot, {name: m.to(device) for name, m in maps.items()}


def slot_major_rows(basis_k: torch.Tensor, basis_v: torch.Tensor, window_k: torch.Tensor, window_v: torch.Tensor,
                    scales: dict[str, torch.Tensor] | None = None) -> SlotRows:
    """Slot-major tensors (bases [S, M, rank, kv_width], exact rows [S, W, kv_width], and with
    int8 their scales by name, [..., kv_heads]) copied into an arena with its maps; every
    plane keeps all its rows."""
    num_slots, planes, rank_k = basis_k.shape[:3]
    rank_v, exact_rows = basis_v.shape[2], window_k.shape[1]
    num_rows, maps = slot_major_maps(num_slots, [rank_k] * planes, [rank_v] * planes, rank_k, rank_v,
                                     exact_rows, basis_k.device)

    def pack(parts: dict[str, torch.Tensor]) -> torch.Tensor:
        some = parts["basis_k"]
        arena = torch.zeros(num_rows, some.shape[-1], dtype=some.dtype, device=some.device)
        for name, t in parts.items():
            arena[maps[name].reshape(-1)] = t.reshape(-1, t.shape[-1])
        return arena

    tensors = dict(basis_k=basis_k, basis_v=basis_v, window_k=window_k, window_v=window_v)
    return SlotRows(pack(tensors), pack(scales) if scales else None, **maps)


def gather_rows(rows: SlotRows, name: str, slots: torch.Tensor, planes: int | None = None) -> torch.Tensor:
    """The logical rows `name` of `slots` ([B] int64) as float32, [B, *map.shape[1:], kv_width]
    (int8 rows dequantised with their scales); a basis only its first `planes` planes."""
    index = rows.map(name).index_select(0, slots)
    if planes is not None:
        index = index[:, :planes]
    return read_arena(rows, index)


def read_arena(rows: SlotRows, at: torch.Tensor) -> torch.Tensor:
    """Arena rows `at` (any shape of int64 rows) as float32, [*at.shape, kv_width] (int8
    rows dequantised with their scales)."""
    flat, shape = at.reshape(-1), (*at.shape, rows.kv_width)
    stored = rows.arena.index_select(0, flat)
    if rows.scales is None:
        return stored.float().view(shape)
    return dequantize(stored, rows.scales.index_select(0, flat)).view(shape)
