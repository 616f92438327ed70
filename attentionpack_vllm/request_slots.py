"""Which slot of the per-request pools each running request owns.

vLLM never tells an attention backend that a request finished, so the engine glue
reports finished and preempted request ids here, and each step maps the batch's
request ids to slots. A request keeps its slot from its first prefill until it
finishes or is preempted (a preempted request starts over with a new prefill).
"""
from __future__ import annotations


class SlotExhaustedError(RuntimeError):
    pass


class RequestSlots:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._slot_of: dict[str, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first

    def slot_for(self, request_id: str) -> int:
        """The request's slot, assigning a free one to a request seen for the first time."""
        slot = self._slot_of.get(request_id)
        if slot is None:
            if not self._free:
                raise SlotExhaustedError(
                    f"AttentionPack has no free request slot for {request_id!r}: all "
                    f"{self.num_slots} slots (max_num_seqs) are held by running requests")
            slot = self._free.pop()
            self._slot_of[request_id] = slot
        return slot

    def release(self, request_ids) -> list[int]:
        """Return the slots of finished or preempted requests; the slots returned."""
        freed = []
        for request_id in request_ids:
            slot = self._slot_of.pop(request_id, None)
            if slot is not None:
                self._free.append(slot)
                freed.append(slot)
        return freed

    def __len__(self) -> int:
        return len(self._slot_of)
