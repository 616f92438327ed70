"""Arena rows handed out by use (row_pool.py): the worker's allocator, the scheduler's
reservations, and that the two agree step by step (no vLLM)."""
import random

import numpy as np
import pytest
import torch

from attentionpack_vllm.config import AttentionPackConfig
from attentionpack_vllm.kernels.layout import TEXT
from attentionpack_vllm.kernels.slot_rows import ZERO_ROW
from attentionpack_vllm.plan import CompressionPlan
from attentionpack_vllm.row_pool import (RowAllocator, RowPoolExhaustedError, RowReservations, exact_rows_during,
                                         full_request_rows, request_rows)
from attentionpack_vllm.windows import WindowTracker

PLAN = CompressionPlan.build(AttentionPackConfig.from_dict(
    {"rank_text_key": 6, "rank_text_value": 5, "rank_vision_key": 4, "rank_vision_value": 3,
     "window_size": 3, "sink_tokens": 2}), num_kv_heads=1, head_size=16, has_image=True)


def test_a_request_holds_its_planes_up_to_its_tokens_and_its_exact_rows():
    assert full_request_rows(PLAN) == 6 + 5 + 4 + 3 + 2 * 5
    assert request_rows(PLAN, text_tokens=2, image_tokens=0, exact_rows=2) == 2 + 2 + 2 * 2
    assert request_rows(PLAN, text_tokens=50, image_tokens=3, exact_rows=5) == 6 + 5 + 3 + 3 + 2 * 5


def test_allocator_hands_out_distinct_rows_and_takes_them_back():
    rows = RowAllocator.empty(PLAN, num_slots=3, num_rows=1 + 2 * full_request_rows(PLAN))
    rows.fit(0, text_tokens=4, image_tokens=2, exact_rows=3, grow=True)
    rows.fit(2, text_tokens=9, image_tokens=0, exact_rows=2, grow=True)
    held0, held2 = rows.held(0), rows.held(2)
    assert held0 == 4 + 4 + 2 + 2 + 6 and held2 == 6 + 5 + 4
    assert rows.maps["basis_k"][0, TEXT, :4].tolist() != [ZERO_ROW] * 4
    assert (rows.maps["basis_k"][0, TEXT, 4:] == ZERO_ROW).all() and (rows.maps["basis_v"][1] == ZERO_ROW).all()
    taken = torch.cat([m[s].reshape(-1) for s in (0, 2) for m in rows.maps.values()])
    taken = taken[taken != ZERO_ROW]
    assert len(set(taken.tolist())) == held0 + held2 == len(taken)   # no row twice
    assert sorted(rows.take_fresh()) == sorted(taken.tolist()) and rows.take_fresh() == []
    rows.fit(0, 4, 2, exact_rows=2, grow=False)      # the window folded: one key and one value row back
    assert rows.held(0) == held0 - 2 and (rows.maps["window_k"][0, 2:] == ZERO_ROW).all()
    rows.fit(0, 1, 0, exact_rows=2, grow=False)      # bases never shrink
    assert rows.held(0) == held0 - 2
    free = rows.free_rows
    rows.release(2)
    assert rows.free_rows == free + held2 and rows.held(2) == 0 and (rows.maps["basis_k"][2] == ZERO_ROW).all()


def assert_maps_match(rows: RowAllocator) -> None:
    """The maps name each slot's held rows, every arena row at most once, and the free rows
    are the rest."""
    named = torch.cat([m.reshape(-1) for m in rows.maps.values()])
    named = named[named != ZERO_ROW]
    assert len(set(named.tolist())) == len(named), "an arena row named twice"
    for slot in range(rows.maps["window_k"].shape[0]):
        in_maps = sum(int((m[slot] != ZERO_ROW).sum()) for m in rows.maps.values())
        assert in_maps == rows.held(slot)
    assert len(named) + rows.free_rows == rows.num_rows - 1


def test_a_step_fitted_at_once_matches_slot_by_slot():
    """`fit_many` over a step's slots holds what `fit` slot by slot holds, both ways."""
    one, many = (RowAllocator.empty(PLAN, num_slots=5, num_rows=1 + 5 * full_request_rows(PLAN)) for _ in range(2))
    rng = np.random.default_rng(0)
    text, image = np.zeros(5, dtype=np.int64), np.zeros(5, dtype=np.int64)
    for step in range(30):
        slots = np.sort(rng.choice(5, size=rng.integers(1, 5), replace=False))
        text[slots] += rng.integers(0, 4, slots.size)
        image[slots] += rng.integers(0, 2, slots.size)
        for grow in (False, True):
            exact = rng.integers(0, PLAN.exact_rows + 1, slots.size)
            for slot, e in zip(slots.tolist(), exact.tolist()):
                one.fit(slot, int(text[slot]), int(image[slot]), e, grow=grow)
            many.fit_many(slots, text[slots], image[slots], exact, grow=grow)
            assert [one.held(s) for s in range(5)] == [many.held(s) for s in range(5)]
            assert_maps_match(many)
        assert len(one.take_fresh()) == len(many.take_fresh())  # the rows may differ (the order of returns)
        if step % 7 == 6:
            one.release(int(slots[0]))
            many.release(int(slots[0]))
            text[slots[0]] = image[slots[0]] = 0
    assert_maps_match(one)


def test_allocator_refuses_to_hand_out_rows_it_has_not_got():
    rows = RowAllocator.empty(PLAN, num_slots=2, num_rows=1 + full_request_rows(PLAN))
    rows.fit(0, 50, 50, 5, grow=True)
    with pytest.raises(RowPoolExhaustedError, match="row pool has 0 free rows"):
        rows.fit(1, 1, 0, 1, grow=True)
    with pytest.raises(ValueError, match="cannot hold one request"):
        RowAllocator.empty(PLAN, num_slots=2, num_rows=full_request_rows(PLAN))


def test_reservations_refuse_what_does_not_fit_and_undo():
    res = RowReservations(PLAN, capacity=30)
    assert res.reserve("a", 10, 10, single_token=False, decode_tokens_left=0)  # 6+5+4+3 bases + 2*2 sinks = 22
    assert res.free_rows == 8
    assert not res.reserve("b", 10, 0, single_token=False, decode_tokens_left=0)  # 6+5 + 2*2 = 15 > 8
    assert res.free_rows == 8
    assert res.reserve("b", 1, 0, single_token=False, decode_tokens_left=0)   # 1+1 + 2*1 sink = 4
    res.undo_last()
    assert res.free_rows == 8
    res.release("a")
    assert res.free_rows == 30


def test_reservations_hold_the_window_the_request_will_fill():
    res = RowReservations(PLAN, capacity=100)
    assert res.reserve("short", 1, 0, single_token=False, decode_tokens_left=1)   # 1+1 + 2*(1 sink + 1)
    assert res.reserve("long", 1, 0, single_token=False)                          # 1+1 + 2*min(5, 1 + 3)
    assert res.free_rows == 100 - 6 - 10


def test_exact_rows_follow_the_window_tracker():
    tracker, held = WindowTracker.for_plan(1, PLAN), 0
    steps = [(7, False)] + [(1, True)] * 8 + [(5, False)] + [(1, True)] * 4
    tokens = 0
    for count, single in steps:
        tokens += count
        during, held = exact_rows_during(PLAN, held, tokens, single)
        if single:
            lengths, _ = tracker.advance([0])
            assert during == lengths[0]
        else:
            tracker.prefilled([0], [tokens])
        assert held == tracker.length(0)


@pytest.mark.parametrize("seed", range(5))
def test_the_worker_never_holds_more_than_the_scheduler_reserved(seed):
    """Random requests (prefill chunks, decode steps, finishing) through both sides with the
    same rules: the allocator's rows per request never exceed the reservation, and its
    total never exceeds the pool."""
    rng = random.Random(seed)
    capacity = 3 * full_request_rows(PLAN)
    res = RowReservations(PLAN, capacity)
    rows = RowAllocator.empty(PLAN, num_slots=6, num_rows=1 + capacity)
    tracker = WindowTracker.for_plan(6, PLAN)
    state = {}   # slot -> [request id, text, image, prompt left]
    next_id, refused = 0, 0
    for _ in range(200):
        free_slots = [s for s in range(6) if s not in state]
        if free_slots and rng.random() < 0.3:
            state[free_slots[0]] = [f"r{next_id}", 0, 0, rng.randint(1, 20)]
            next_id += 1
        step = []
        for slot, (rid, text, image, left) in list(state.items()):
            chunk = min(left, rng.randint(1, 8)) if left else 1
            image_part = rng.randint(0, chunk) if left else 0
            single = chunk == 1 and text + image > 0
            if res.reserve(rid, text + chunk - image_part, image + image_part, single):
                state[slot] = [rid, text + chunk - image_part, image + image_part, left - chunk if left else 0]
                step.append((slot, single, text + image))
            else:
                refused += 1
        held = {slot: tracker.length(slot) if context else 0 for slot, _, context in step}
        for slot, _, _ in step:
            rows.fit(slot, state[slot][1], state[slot][2], held[slot], grow=False)
        for slot, single, context in step:
            tokens = state[slot][1] + state[slot][2]
            if single:
                during = tracker.advance([slot])[0][0]
            else:
                during = max(held[slot], min(PLAN.sink_tokens, tokens))
                tracker.prefilled([slot], [tokens])
            rows.fit(slot, state[slot][1], state[slot][2], during, grow=True)
        for slot, (rid, *_) in state.items():
            reserved = res._by_request.get(rid)
            assert rows.held(slot) <= (reserved.rows if reserved else 0)
        assert_maps_match(rows)
        for slot in [s for s in state if rng.random() < 0.1]:
            res.release(state.pop(slot)[0])
            rows.release(slot)
            tracker.clear([slot])
    assert refused > 0, "the pool never ran short: the run checked nothing"
