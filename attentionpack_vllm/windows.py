"""Host-side window lengths: which requests' windows fill, and so fold, at each step.

Every layer's window of a request holds the same tokens (each decode step appends
one token in every layer, and every layer folds at the same step), so one host-side
count per slot describes all of them. The metadata builder advances it once per
step; the decode step never reads a window length back from the device.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class WindowTracker:
    """Valid window rows of every slot, and the fold schedule they imply."""

    def __init__(self, num_slots: int, window_size: int):
        self.window_size = window_size
        self.lengths = np.zeros(num_slots, dtype=np.int64)

    def length(self, slot: int) -> int:
        return int(self.lengths[slot])

    def clear(self, slots: Sequence[int]) -> None:
        """The windows are empty: a new request, or the rows were folded by a prefill chunk."""
        self.lengths[np.asarray(slots, dtype=np.int64)] = 0

    def advance(self, slots: Sequence[int]) -> tuple[list[int], list[int]]:
        """One decode token per slot joins its window.

        Returns (window lengths after the append, indices into `slots` of the windows
        that are now full and fold at the end of this step). Folded windows restart at 0.
        """
        index = np.asarray(slots, dtype=np.int64)
        after = self.lengths[index] + 1
        full = after >= self.window_size
        self.lengths[index] = np.where(full, 0, after)
        return after.tolist(), np.flatnonzero(full).tolist()
