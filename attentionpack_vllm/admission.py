"""The scheduler's side of the row pool: a request's step is scheduled only if its rows fit.

vLLM's KV cache manager allocates each scheduled request's pages for the step
(`allocate_slots`) and frees them when the request finishes or is preempted (`free`);
the plugin wraps both (plugin.py) to reserve and give back the request's arena rows
too (`row_pool.RowReservations`). When the rows do not fit, `allocate_slots` answers
as it does when pages run out: a waiting request waits, a running one makes vLLM
preempt another.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.logger import init_logger

from . import runtime
from .row_pool import RowReservations

logger = init_logger("vllm.attentionpack")


@dataclass
class Admission:
    rows: RowReservations
    sliding_window: int | None   # images longer than this are text to the worker (vLLM's mm_prefix ranges)

    def reserve(self, request: Any, num_new_tokens: int, extra_computed: int) -> bool:
        computed = request.num_computed_tokens + extra_computed
        tokens = computed + num_new_tokens
        fewest, most = image_token_bounds(request, tokens, self.sliding_window)
        # Either count may be the worker's: reserve for the most of each.
        text, image = tokens - fewest, most
        if not self.rows.plan.has_image:
            text, image = tokens, 0
        max_tokens = getattr(request, "max_tokens", None)
        left = None if max_tokens is None else max(0, max_tokens - request.num_output_tokens)
        if self.rows.reserve(request.request_id, text, image, single_token=num_new_tokens == 1 and computed > 0,
                             tokens=tokens, decode_tokens_left=left):
            return True
        logger.info_once("AttentionPack: the row pool is full (%d of %d rows reserved): requests wait, or "
                         "running ones are preempted, until rows are free", self.rows.capacity - self.rows.free_rows,
                         self.rows.capacity)
        return False


def image_token_bounds(request: Any, tokens: int, sliding_window: int | None) -> tuple[int, int]:
    """(fewest, most) image tokens among the request's first `tokens`, as the worker may count
    them: vLLM's mm_prefix ranges (the worker's image masks) leave out an image longer than
    the text model's sliding window, unless the model clamps it in its kernel."""
    fewest = most = 0
    for feature in getattr(request, "mm_features", None) or ():
        if getattr(feature, "modality", None) == "audio":
            continue
        for start, end in feature.mm_position.extract_embeds_range():
            count = max(0, min(end + 1, tokens) - start)
            most += count
            if sliding_window is None or end - start + 1 <= sliding_window:
                fewest += count
    return fewest, most


def attach(scheduler: Any) -> None:
    """Give the scheduler's KV cache manager the row reservations, when the row pool is
    bounded (`runtime.shipped_row_pool`); otherwise every slot holds its full rows and
    nothing needs reserving."""
    vllm_config = scheduler.vllm_config
    arena_rows = runtime.shipped_row_pool(vllm_config)
    if arena_rows is None:
        return
    from .engine_setup import memory_report
    _, plan, _ = memory_report(runtime.active_config(vllm_config), vllm_config.model_config,
                               vllm_config.parallel_config, runtime.shipped_request_tokens(vllm_config))
    text_config = vllm_config.model_config.hf_text_config
    window = getattr(text_config, "sliding_window", None)
    if getattr(text_config, "mm_prefix_clamp_sliding_window", False):
        window = None
    scheduler.kv_cache_manager._attentionpack_admission = Admission(
        RowReservations(plan, arena_rows - 1), window if isinstance(window, int) else None)


def admission_of(manager: Any) -> Admission | None:
    return getattr(manager, "_attentionpack_admission", None)
