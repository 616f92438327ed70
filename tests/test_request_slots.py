"""Slot assignment for running requests."""
import pytest

from attentionpack_vllm.request_slots import RequestSlots, SlotExhaustedError


def test_slots_are_stable_released_and_reused():
    slots = RequestSlots(2)
    a, b = slots.slot_for("a"), slots.slot_for("b")
    assert {a, b} == {0, 1} and slots.slot_for("a") == a
    with pytest.raises(SlotExhaustedError, match="max_num_seqs"):
        slots.slot_for("c")
    slots.release(["a", "unknown"])
    assert slots.slot_for("c") == a and len(slots) == 2
