"""Host-side lengths of each request's exact rows: sinks and window, and when they fold.

A slot's exact rows (`SlotPool.window_k/v`) hold, at full precision, the request's
first `sink_tokens` tokens (attention sinks, kept for the request's life) followed by
its window of newest decode tokens (folded into the text basis when `window_size` of
them have gathered). Tokens fill the sinks first, so while any window row or factor
record exists, every sink row is filled: the valid exact rows are always the prefix
[0, length) of the buffer, and the window is rows [sink_tokens, length).

Every layer's exact rows of a request hold the same tokens (each decode step appends
one token in every layer, and every layer folds at the same step), so one host-side
count per slot describes all of them. The metadata builder advances it once per step;
the decode step never reads a length back from the device.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class WindowTracker:
    """Valid exact rows (sinks + window) of every slot, and the fold schedule they imply."""

    def __init__(self, num_slots: int, window_size: int, sink_tokens: int = 0):
        self.window_size = window_size
        self.sink_tokens = sink_tokens
        self.lengths = np.zeros(num_slots, dtype=np.int64)

    @classmethod
    def for_plan(cls, num_slots: int, plan) -> "WindowTracker":
        return cls(num_slots, plan.window_size, plan.sink_tokens)

    def length(self, slot: int) -> int:
        """Valid exact rows of the slot: its sinks and its window."""
        return int(self.lengths[slot])

    def window_length(self, slot: int) -> int:
        """Rows of the slot's window (the exact rows after the sinks)."""
        return max(0, int(self.lengths[slot]) - self.sink_tokens)

    def clear(self, slots: Sequence[int]) -> None:
        """A new request: nothing is held."""
        self.lengths[np.asarray(slots, dtype=np.int64)] = 0

    def prefilled(self, slots: Sequence[int], seq_lens: Sequence[int]) -> None:
        """Prefill chunks ran (their window folded first): only the sinks remain,
        min(sink_tokens, seq_len) of them."""
        self.lengths[np.asarray(slots, dtype=np.int64)] = np.minimum(
            np.asarray(seq_lens, dtype=np.int64), self.sink_tokens)

    def advance(self, slots: Sequence[int]) -> tuple[list[int], list[int]]:
        """One decode token per slot joins its exact rows (a sink row while the sinks are
        not full, a window row after).

        Returns (exact lengths after the append, indices into `slots` of the windows
        that are now full and fold at the end of this step). A folded window leaves the
        sinks only.
        """
        index = np.asarray(slots, dtype=np.int64)
        after = self.lengths[index] + 1
        full = after >= self.sink_tokens + self.window_size
        self.lengths[index] = np.where(full, self.sink_tokens, after)
        return after.tolist(), np.flatnonzero(full).tolist()
