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


@dataclass
class RowAllocator:
    """Which arena rows every slot holds, and the maps that say so (worker side).

    `maps` are host tensors ([slots, M, rank] for the bases, [slots, exact_rows] for the
    windows), every logical row on the zero row until it is handed one; `device_maps`
    their copies where the kernels run (the same tensors on CPU)."""

    plan: CompressionPlan
    maps: dict[str, torch.Tensor]
    num_rows: int                                      # arena rows, the zero row included
    device_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    _free: list[int] = field(default_factory=list)
    _held: dict[tuple[int, str, int], int] = field(default_factory=dict)  # (slot, name, plane) -> rows
    _fresh: list[int] = field(default_factory=list)
    _dirty: bool = False

    @classmethod
    def empty(cls, plan: CompressionPlan, num_slots: int, num_rows: int,
              device: torch.device | str = "cpu") -> "RowAllocator":
        """Nothing held yet: every logical row of every slot on the zero row."""
        if num_rows < 1 + full_request_rows(plan):
            raise ValueError(f"an arena of {num_rows} rows cannot hold one request's "
                             f"{full_request_rows(plan)} rows (and the zero row)")
        layout, planes = plan.layout, plan.num_modalities
        zeros = lambda *shape: torch.full(shape, ZERO_ROW, dtype=torch.int64)  # noqa: E731
        maps = {"basis_k": zeros(num_slots, planes, layout.rank_k), "basis_v": zeros(num_slots, planes, layout.rank_v),
                "window_k": zeros(num_slots, plan.exact_rows), "window_v": zeros(num_slots, plan.exact_rows)}
        on_cpu = torch.device(device).type == "cpu"
        device_maps = maps if on_cpu else {name: m.to(device) for name, m in maps.items()}
        return cls(plan, maps, num_rows, device_maps, _free=list(range(num_rows - 1, ZERO_ROW, -1)))

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def held(self, slot: int) -> int:
        """Arena rows the slot holds."""
        return sum(n for (s, _, _), n in self._held.items() if s == slot)

    def fit(self, slot: int, text_tokens: int, image_tokens: int, exact_rows: int, grow: bool) -> None:
        """Give back (grow=False) or take (grow=True) rows so that the slot holds what a request
        of these tokens and exact rows uses; a shrinking call never takes, a growing one
        never gives back."""
        wanted = basis_rows(self.plan, text_tokens, image_tokens)
        wanted["window_k", 0] = wanted["window_v", 0] = exact_rows
        for (name, plane), rows in wanted.items():
            held = self._held.get((slot, name, plane), 0)
            if grow and rows > held:
                self._take(slot, name, plane, held, rows)
            elif not grow and rows < held and name.startswith("window"):
                self._give_back(slot, name, plane, rows, held)

    def release(self, slot: int) -> None:
        """A request ended: all of the slot's rows go back."""
        for (s, name, plane), held in list(self._held.items()):
            if s == slot:
                self._give_back(slot, name, plane, 0, held)

    def take_fresh(self) -> list[int]:
        """The rows handed out since the last call (to be zeroed before use)."""
        fresh, self._fresh = self._fresh, []
        return fresh

    def sync(self) -> None:
        """Copy changed maps to the device (a no-op on CPU, where they are the same tensors)."""
        if self._dirty and self.device_maps is not self.maps:
            for name, m in self.maps.items():
                self.device_maps[name].copy_(m, non_blocking=True)
        self._dirty = False

    def _index(self, slot: int, name: str, plane: int, lo: int, hi: int):
        return (slot, plane, slice(lo, hi)) if name.startswith("basis") else (slot, slice(lo, hi))

    def _take(self, slot: int, name: str, plane: int, lo: int, hi: int) -> None:
        count = hi - lo
        if count > len(self._free):
            raise RowPoolExhaustedError(
                f"AttentionPack's row pool has {len(self._free)} free rows, a request needs {count} more "
                f"({name}, plane {plane}): the scheduler's row reservations should have prevented this")
        rows = self._free[-count:]
        del self._free[-count:]
        self.maps[name][self._index(slot, name, plane, lo, hi)] = torch.tensor(rows, dtype=torch.int64)
        self._held[slot, name, plane] = hi
        self._fresh += rows
        self._dirty = True

    def _give_back(self, slot: int, name: str, plane: int, lo: int, hi: int) -> None:
        index = self._index(slot, name, plane, lo, hi)
        self._free += self.maps[name][index].tolist()
        self.maps[name][index] = ZERO_ROW
        if lo:
            self._held[slot, name, plane] = lo
        else:
            self._held.pop((slot, name, plane), None)
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
