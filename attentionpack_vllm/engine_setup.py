"""Engine start-up with AttentionPack: validate, adjust the engine, and log what it gives."""
from __future__ import annotations

import dataclasses
import json
import os

from vllm.logger import init_logger

from . import runtime
from .engine_checks import EngineFeatures, raise_on_conflicts
from .memory import MemoryReport, size_row_pool
from .parallel import WorkerShape
from .kernels.layout import IMAGE
from .plan import CompressionPlan, RequestTokens
from .row_pool import full_request_rows
from .token_bounds import request_tokens

logger = init_logger("vllm.attentionpack")  # under vllm's logger: same format and level


def prepare_engine(args, model_config) -> None:
    """Called with the EngineArgs once the model config exists, before anything starts."""
    config = runtime.config_from_vllm(args)
    runtime.set_active_config(config)
    raise_on_conflicts(EngineFeatures(
        speculative_decoding=args.speculative_config is not None,
        kv_transfer=args.kv_transfer_config is not None,
        kv_offloading=bool(args.kv_offloading_size),
        decode_context_parallel_size=args.decode_context_parallel_size or 1,
        prefill_context_parallel_size=args.prefill_context_parallel_size or 1,
        kv_cache_dtype=args.kv_cache_dtype,
        sliding_window=model_config.get_sliding_window() is not None,
        encoder_decoder=model_config.is_encoder_decoder,
        mla=model_config.use_mla,
    ))
    if args.enable_prefix_caching is not False:
        logger.warning("AttentionPack: prefix caching switched off (pages hold factors in one "
                       "request's private basis and cannot be shared)")
    args.enable_prefix_caching = False
    if model_config.is_multimodal_model and not model_config.is_mm_prefix_lm:
        # vLLM passes image position ranges to attention backends only for prefix-LM
        # models; AttentionPack uses them to find image tokens (attention stays causal).
        # Set where the arch config is regenerated from, in the arch config itself, and
        # drop the cached property that may already hold the old answer.
        model_config.hf_config.is_mm_prefix_lm = True
        model_config.model_arch_config = dataclasses.replace(
            model_config.model_arch_config, is_mm_prefix_lm=True)
        model_config.__dict__.pop("is_mm_prefix_lm", None)
    bounds = request_tokens(model_config)
    runtime.ship_request_tokens(args, bounds)  # for the engine core and the workers
    report, plan, layers = memory_report(config, model_config, args, bounds)
    logger.info("Using AttentionPack attention backend (%s)", "attentionpack_vllm")
    logger.info("AttentionPack settings: %s", json.dumps(config.to_dict(), sort_keys=True))
    logger.info("AttentionPack bytes per token per layer: %d (dense %d: %s); "
                "record = K' %d + V' %d + importance + flags%s", report.record_bytes,
                report.dense_token_bytes, size_change(report.token_ratio), plan.layout.rank_k,
                plan.layout.rank_v, " (int8 factors with float32 scales)" if plan.int8 else "")
    if report.crossover_tokens() is None:
        logger.warning("AttentionPack at these ranks stores at least as many bytes per token as "
                       "the dense cache, plus the per-request bases: it will hold fewer tokens, "
                       "not more. Set `rank` (or rank_text_key, rank_text_value, "
                       "rank_vision_key, rank_vision_value) well below the KV width, %d, to "
                       "save memory.", plan.kv_width)
    logger.info("AttentionPack bytes per request beside its records: at most %d over %d layers (bases at "
                "full rank, %d sink tokens, a full %d-token window; a request holds only the rows it "
                "uses); even at that most, compression pays from %s tokens per request",
                report.slot_bytes * layers, layers, plan.sink_tokens, plan.window_size,
                report.crossover_tokens() or "no number of")
    if plan.has_image and bounds.image is not None and bounds.image < max(plan.layout.rank_k, plan.layout.rank_v):
        logger.info("AttentionPack: image bases take %d key and %d value rows per layer: a request "
                    "holds at most %d image tokens (--limit-mm-per-prompt times the model's tokens "
                    "per item)", plan.ranks_k[IMAGE], plan.ranks_v[IMAGE], bounds.image)
    shape = WorkerShape.of(model_config, args)
    if shape.workers > 1:
        for line in shape.describe(report, plan):
            logger.info(line)


def kv_budget(args) -> tuple[int, str] | None:
    """One worker's KV cache budget as known before the engine starts, and its source.

    Set: `VLLM_CPU_KVCACHE_SPACE` (GiB, CPU; it wins over the flag, as in vLLM's CPU
    platform) or `--kv-cache-memory-bytes`. Profiled: measured only after the model
    loads, so taken as the device's memory (on CPU, NUMA node 0's) times
    `--gpu-memory-utilization`, an upper bound: the weights and activations come out
    of it too. None when the device memory cannot be read here."""
    from vllm.platforms import current_platform

    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
    if current_platform.is_cpu() and space != "" and int(space) > 0:
        return int(space) << 30, f"VLLM_CPU_KVCACHE_SPACE={space}"
    if args.kv_cache_memory_bytes:
        return int(args.kv_cache_memory_bytes), "--kv-cache-memory-bytes"
    try:
        total = int(current_platform.get_device_total_memory())
    except Exception:  # noqa: BLE001 - e.g. no device visible from this process
        return None
    utilization = args.gpu_memory_utilization
    return int(total * utilization), (f"profiled budget, assumed at most the device memory "
                                      f"{total} x gpu_memory_utilization {utilization}")


def size_slot_pools(args, model_config) -> None:
    """Size each layer's row arena (the requests' bases and exact rows, `row_pool`) against
    the worker's KV cache budget, before the scheduler config is built: rows for every one
    of `max_num_seqs` requests at full rank, capped at `max_pool_fraction` of the budget.
    The size goes to the engine core (which admits a request's step only while its rows
    fit) and the workers (which allocate it) with the config (`runtime.ship_row_pool`)."""
    config = runtime.config_from_vllm(args)
    report, plan, layers = memory_report(config, model_config, args, runtime.shipped_request_tokens(args))
    slots, full_rows = int(args.max_num_seqs), full_request_rows(plan)
    budget = kv_budget(args)
    if budget is None:
        logger.info("AttentionPack keeps rows for %d requests at full rank (max_num_seqs): %d bytes per "
                    "request over %d layers; the KV cache budget is not known before start-up, so the "
                    "rows are not sized against it", slots, report.slot_bytes * layers, layers)
        return
    budget_bytes, source = budget
    sizing = size_row_pool(slots, full_rows, report.row_bytes * layers, report.slot_fixed_bytes * layers,
                           budget_bytes, config.max_pool_fraction)
    runtime.ship_row_pool(args, sizing.rows + 1)
    if sizing.capped:
        logger.warning(
            "AttentionPack: rows for all %d requests (max_num_seqs) at full rank would take %d bytes, more "
            "than max_pool_fraction %g of the %d-byte KV cache budget (%s); the row pool keeps %d rows "
            "(%d bytes), enough for %d requests at full rank with a full window. A request holds only the "
            "rows it uses and is scheduled while they fit; raise the budget or max_pool_fraction, or lower "
            "the ranks, window_size or sink_tokens, to run more large requests at once",
            slots, sizing.uncapped_pool_bytes, sizing.max_fraction, budget_bytes, source, sizing.rows,
            sizing.pool_bytes, sizing.full_requests)
    logger.info("AttentionPack row pool: %d rows of %d bytes (all %d layers of a worker) for up to %d requests "
                "(max_num_seqs), %d of them at full rank at once; %d bytes with the window scores, %.1f%% of "
                "the %d-byte KV cache budget (%s; max_pool_fraction %g)", sizing.rows, sizing.row_bytes, layers,
                slots, min(slots, sizing.full_requests), sizing.pool_bytes, 100 * sizing.pool_bytes / budget_bytes,
                budget_bytes, source, sizing.max_fraction)


def size_change(ratio: float) -> str:
    """'3.20x smaller' / '1.01x larger' for a dense-over-packed byte ratio."""
    if ratio >= 1:
        return f"{ratio:.2f}x smaller"
    return f"{1 / ratio:.2f}x larger"


def memory_report(config, model_config, parallel,
                  bounds: RequestTokens) -> tuple[MemoryReport, CompressionPlan, int]:
    """Figures of one worker: its shard of the KV heads and the layers of its stage
    (`parallel`: ParallelConfig or EngineArgs; None: a single worker), with the slot planes
    sized to `bounds`."""
    shape = WorkerShape.of(model_config, parallel)
    plan = runtime.model_plan(config, model_config, shape.kv_heads, model_config.get_head_size(), bounds)
    return MemoryReport.of(plan, model_config.dtype), plan, shape.worker_layers


def log_capacity(vllm_config) -> None:
    """One line next to vLLM's own 'KV cache size' line, in AttentionPack's terms."""
    cache = vllm_config.cache_config
    tokens = cache.kv_cache_size_tokens
    if tokens is None:
        return
    report, plan, layers = memory_report(runtime.active_config(vllm_config), vllm_config.model_config,
                                         vllm_config.parallel_config, runtime.shipped_request_tokens(vllm_config))
    max_num_seqs = vllm_config.scheduler_config.max_num_seqs
    arena_rows = runtime.arena_rows(vllm_config, plan, max_num_seqs)
    pool_layer_bytes = arena_rows * report.row_bytes + max_num_seqs * report.slot_fixed_bytes
    pool_bytes = pool_layer_bytes * layers
    budget = tokens * report.record_bytes * layers + pool_bytes
    dense_tokens = budget // (report.dense_token_bytes * layers)
    max_len = vllm_config.model_config.max_model_len
    logger.info("AttentionPack KV cache: %d tokens in %d bytes of records plus %d bytes of slot "
                "pools for %d requests; the dense cache would hold %d tokens (%.1fx); maximum "
                "concurrency for %d tokens per request: %.2fx (slots: %d)",
                tokens, tokens * report.record_bytes * layers, pool_bytes, max_num_seqs,
                dense_tokens, tokens / max(dense_tokens, 1), max_len,
                min(tokens / max_len, max_num_seqs), max_num_seqs)
    shape = WorkerShape.of(vllm_config.model_config, vllm_config.parallel_config)
    if shape.workers > 1:
        logger.info(shape.describe_capacity(report, tokens, pool_layer_bytes))
