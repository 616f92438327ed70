"""Arena rows handed to requests as they use them (`kernels/slot_rows.py`).

A request holds, in every layer's arena, only the rows it uses:

* each basis plane (key and value, per modality) min(the plane's rank, the tokens of
  that modality the request has had so far) rows: a basis has no more directions
  than tokens;
* its exact rows (sinks, then window) as far as they are filled.

Two parties count the same rows with the same rules (`exact_rows_during`,
`request_rows`), so that they agree without talking:

* `RowAllocator`, in each worker process: which arena rows each slot holds. It edits
  the slot-row maps (host tensors, copied to the device once per step when they
  changed) and names the rows it handed out fresh, which every layer zeroes before use.
* `RowReservations`, in the scheduler: how many rows each running request may hold
  in this step, its window counted as full as its remaining decode steps can fill it
  (a window fills within `window_size` steps: admitting a request for less would soon
  preempt it). A request is admitted (or a running one keeps going) only while the
  rows it needs fit; otherwise vLLM's scheduler does what it does when pages run out
  (waits, or preempts a running request).

The worker never holds more rows for a request than the scheduler reserved for it: a
step's reservation is what the step's rows can reach (`exact_rows_during` counts the
window still held while a prefill chunk folds it), and the worker gives rows back
(windows that folded) before it takes new ones in a step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .kernels.layout import IMAGE, TEXT
from .kernels.slot_rows import ZERO_ROW
from .plan import CompressionPlan


class RowPoolExhaustedError(RuntimeError):
    pass


def exact_rows_during(plan: CompressionPlan, held: int, tokens_after: int, single_token: bool) -> tuple[int, int]:
    """(exact rows a step of a request reaches, exact rows it leaves) as `windows.WindowTracker`
    moves them: `held` before the step; a single-token step appends one (a full window
    folds after the step, leaving the sinks); a prefill chunk folds what its window held,
    then keeps min(sink_tokens, tokens) sinks."""
    if single_token:
        during = held + 1
        return during, plan.sink_tokens if during >= plan.exact_rows else during
    after = min(plan.sink_tokens, tokens_after)
    return max(held, after), after


def basis_rows(plan: CompressionPlan, text_tokens: int, image_tokens: int) -> dict[tuple[str, int], int]:
    """Rows of each basis plane, (map name, plane) -> rows, for a request with these tokens."""
    rows = {}
    tokens = {TEXT: text_tokens, IMAGE: image_tokens}
    for plane in range(plan.num_modalities):
        rows["basis_k", plane] = min(plan.ranks_k[plane], tokens[plane])
        rows["basis_v", plane] = min(plan.ranks_v[plane], tokens[plane])
    return rows


def request_rows(plan: CompressionPlan, text_tokens: int, image_tokens: int, exact_rows: int) -> int:
    """Arena rows of a request: its basis planes and its exact key and value rows."""
    return sum(basis_rows(plan, text_tokens, image_tokens).values()) + 2 * exact_rows


def full_request_rows(plan: CompressionPlan) -> int:
    """The most rows one request can hold (every plane at its rank, a full window)."""
    planes = range(plan.num_modalities)
    return sum(plan.ranks_k[m] + plan.ranks_v[m] for m in planes) + 2 * plan.exact_rows


class RowAllocator:
    """Which arena rows every slot holds, and the maps that say so (worker side).

    `maps` are host tensors ([slots, M, rank] for the bases, [slots, exact_rows] for the
    windows), every logical row on the zero row until it is handed one; `device_maps`
    their copies where the kernels run (the same tensors on CPU). The bookkeeping is
    numpy over whole steps (`fit_many`): a column per (map, plane), the rows each slot
    holds in it, and a stack of free rows, so a step costs a few array operations
    whatever its batch."""

    def __init__(self, plan: CompressionPlan, num_slots: int, num_rows: int,
                 device: torch.device | str = "cpu") -> None:
        if num_rows < 1 + full_request_rows(plan):
            raise ValueError(f"an arena of {num_rows} rows cannot hold one request's "
                             f"{full_request_rows(plan)} rows (and the zero row)")
        self.plan, self.num_rows = plan, num_rows
        layout, planes = plan.layout, plan.num_modalities
        zeros = lambda *shape: torch.full(shape, ZERO_ROW, dtype=torch.int64)  # noqa: E731
        self.maps = {"basis_k": zeros(num_slots, planes, layout.rank_k), "basis_v": zeros(num_slots, planes, layout.rank_v),
                     "window_k": zeros(num_slots, plan.exact_rows), "window_v": zeros(num_slots, plan.exact_rows)}
        on_cpu = torch.device(device).type == "cpu"
        self.device_maps = self.maps if on_cpu else {name: m.to(device) for name, m in self.maps.items()}
        # Columns: (map, plane) for every basis plane, then the two windows (plane 0).
        self._columns = ([("basis_k", m) for m in range(planes)] + [("basis_v", m) for m in range(planes)]
                         + [("window_k", 0), ("window_v", 0)])
        self._basis_columns = 2 * planes
        self._column_rank = np.array([plan.ranks_k[m] for m in range(planes)]
                                     + [plan.ranks_v[m] for m in range(planes)], dtype=np.int64)
        self._column_plane = np.array([m for _, m in self._columns[:self._basis_columns]], dtype=np.int64)
        self._held = np.zeros((num_slots, len(self._columns)), dtype=np.int64)
        self._views = {name: m.numpy() for name, m in self.maps.items()}  # the host maps, as numpy
        # Free rows as a stack: the top is handed out first (row 1 first, as rows come back on top).
        self._free = np.arange(num_rows - 1, ZERO_ROW, -1, dtype=np.int64)
        self._top = num_rows - 1
        self._fresh: list[np.ndarray] = []
        self._dirty = False

    @classmethod
    def empty(cls, plan: CompressionPlan, num_slots: int, num_rows: int,
              device: torch.device | str = "cpu") -> "RowAllocator":
        """Nothing held yet: every logical row of every slot on the zero row."""
        return cls(plan, num_slots, num_rows, device)

    @property
    def free_rows(self) -> int:
        return self._top

    def held(self, slot: int) -> int:
        """Arena rows the slot holds."""
        return int(self._held[slot].sum())

    def fit(self, slot: int, text_tokens: int, image_tokens: int, exact_rows: int, grow: bool) -> None:
        """`fit_many` for one slot."""
        self.fit_many(np.array([slot]), np.array([text_tokens]), np.array([image_tokens]), np.array([exact_rows]),
                      grow)

    def fit_many(self, slots: np.ndarray, text_tokens: np.ndarray, image_tokens: np.ndarray,
                 exact_rows: np.ndarray, grow: bool) -> None:
        """Give back (grow=False) or take (grow=True) rows so that each of the distinct `slots`
        holds what a request of these tokens and exact rows uses; a shrinking call never
        takes, and gives back only window rows (bases never shrink while a request lives);
        a growing one never gives back."""
        slots = np.asarray(slots, dtype=np.int64)
        tokens = np.empty((len(slots), 2), dtype=np.int64)       # per plane: TEXT, IMAGE
        tokens[:, TEXT], tokens[:, IMAGE] = text_tokens, image_tokens
        wanted = np.empty((len(slots), len(self._columns)), dtype=np.int64)
        wanted[:, :self._basis_columns] = np.minimum(self._column_rank, tokens[:, self._column_plane])
        wanted[:, self._basis_columns:] = np.asarray(exact_rows, dtype=np.int64)[:, None]
        held = self._held[slots]
        if grow:
            self._take(slots, held, np.maximum(wanted, held))
        else:
            wanted[:, :self._basis_columns] = held[:, :self._basis_columns]
            self._give_back(slots, held, np.minimum(wanted, held))

    def release(self, slot: int) -> None:
        """A request ended: all of the slot's rows go back."""
        slots = np.array([slot])
        held = self._held[slots]
        self._give_back(slots, held, np.zeros_like(held))

    def take_fresh(self) -> list[int]:
        """The rows handed out since the last call (to be zeroed before use)."""
        fresh = np.concatenate(self._fresh).tolist() if self._fresh else []
        self._fresh = []
        return fresh

    def sync(self) -> None:
        """Copy changed maps to the device (a no-op on CPU, where they are the same tensors)."""
        if self._dirty and self.device_maps is not self.maps:
            for name, m in self.maps.items():
                self.device_maps[name].copy_(m, non_blocking=True)
        self._dirty = False

    def _positions(self, slots: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        """Every logical row [lo, hi) of every (slot, column), flattened: (slot, column, position)."""
        counts = (hi - lo).reshape(-1)
        group = np.repeat(np.arange(counts.size), counts)
        starts = np.cumsum(counts) - counts
        position = lo.reshape(-1)[group] + np.arange(group.size) - starts[group]
        columns = len(self._columns)
        return slots[group // columns], group % columns, position

    def _each_map(self, slot: np.ndarray, column: np.ndarray, position: np.ndarray):
        """(map view, index into it, which of the flattened rows) per map the rows fall in."""
        for index, (name, plane) in enumerate(self._columns):
            chosen = np.flatnonzero(column == index)
            if chosen.size:
                where = ((slot[chosen], plane, position[chosen]) if name.startswith("basis")
                         else (slot[chosen], position[chosen]))
                yield self._views[name], where, chosen

    def _take(self, slots: np.ndarray, held: np.ndarray, target: np.ndarray) -> None:
        count = int((target - held).sum())
        if not count:
            return
        if count > self._top:
            short = np.flatnonzero((target - held).sum(0))[0]
            name, plane = self._columns[short]
            raise RowPoolExhaustedError(
                f"AttentionPack's row pool has {self._top} free rows, the step's requests need {count} more "
                f"(first {name}, plane {plane}): the scheduler's row reservations should have prevented this")
        rows = self._free[self._top - count:self._top][::-1].copy()   # the top of the stack first
        self._top -= count
        slot, column, position = self._positions(slots, held, target)
        for view, where, chosen in self._each_map(slot, column, position):
            view[where] = rows[chosen]
        self._held[slots] = target
        self._fresh.append(rows)
        self._dirty = True

    def _give_back(self, slots: np.ndarray, held: np.ndarray, target: np.ndarray) -> None:
        count = int((held - target).sum())
        if not count:
            return
        slot, column, position = self._positions(slots, target, held)
        returned = np.empty(count, dtype=np.int64)
        for view, where, chosen in self._each_map(slot, column, position):
            returned[chosen] = view[where]
            view[where] = ZERO_ROW
        self._free[self._top:self._top + count] = returned[::-1]
        self._top += count
        self._held[slots] = target
        self._dirty = True


@dataclass
class _Reservation:
    rows: int = 0           # rows reserved for the request's current step
    exact_held: int = 0     # exact rows the worker's tracker holds after that step


@dataclass
class RowReservations:
    """Rows reserved per running request (scheduler side), against the arena's rows."""

    plan: CompressionPlan
    capacity: int                                  # arena rows requests may hold (not the zero row)
    _by_request: dict[str, _Reservation] = field(default_factory=dict)
    _reserved: int = 0
    _last: tuple[str, _Reservation | None] | None = None   # what `undo_last` restores

    @property
    def free_rows(self) -> int:
        return self.capacity - self._reserved

    def reserve(self, request_id: str, text_tokens: int, image_tokens: int, single_token: bool,
                tokens: int | None = None, decode_tokens_left: int | None = None) -> bool:
        """Reserve what the request's next step needs (tokens counted after the step; `tokens`
        the request's, when the modality counts are bounds that add up to more), and the
        window its remaining decode steps will fill (`decode_tokens_left`; None: a full
        window), so that a running request is not preempted for the window it grows into.
        False, and nothing changes, when the rows do not fit."""
        current = self._by_request.get(request_id, _Reservation())
        tokens = text_tokens + image_tokens if tokens is None else tokens
        during, after = exact_rows_during(self.plan, current.exact_held, tokens, single_token)
        ahead = self.plan.window_size if decode_tokens_left is None else min(self.plan.window_size,
                                                                             decode_tokens_left)
        exact = max(during, min(self.plan.exact_rows, min(self.plan.sink_tokens, tokens) + ahead))
        rows = request_rows(self.plan, text_tokens, image_tokens, exact)
        if rows - current.rows > self.free_rows:
            return False
        self._last = (request_id, self._by_request.get(request_id))
        self._reserved += rows - current.rows
        self._by_request[request_id] = _Reservation(rows, after)
        return True

    def undo_last(self) -> None:
        """Take back the last `reserve` (its step was not scheduled after all)."""
        if self._last is None:
            return
        request_id, previous = self._last
        self._last = None
        self._reserved -= self._by_request.pop(request_id).rows
        if previous is not None:
            self._by_request[request_id] = previous
            self._reserved += previous.rows

    def release(self, request_id: str) -> None:
        """The request finished or was preempted: its rows go back."""
        current = self._by_request.pop(request_id, None)
        if current is not None:
            self._reserved -= current.rows
        self._last = None
