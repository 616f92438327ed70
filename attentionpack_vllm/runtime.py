"""Process-wide AttentionPack state shared by the vLLM glue.

vLLM builds the backend's pieces in several places (spec customisation, the layer
impls, the metadata builder) without a common object to hang state on. What they
share is one `ProcessState` per process (`STATE`): the validated settings, the model
runner whose requests name the batch rows, the bytes the slot pools took, and the row
allocator that the layers' pools and the metadata builder share (`row_pool`). Each
runner's request-to-slot map hangs on the runner itself. The start-up's measurements
(request-token bounds, the row pool's size) travel to the engine core and the workers
inside `additional_config`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .config import AttentionPackConfig
from .plan import CompressionPlan, RequestTokens
from .request_slots import RequestSlots

SETTINGS_KEY = "attentionpack"
REQUEST_TOKENS_KEY = "attentionpack_request_tokens"  # set at start-up, not a user setting
ROW_POOL_KEY = "attentionpack_row_pool"              # set at start-up, not a user setting


@dataclass
class ProcessState:
    """What the glue of one process shares (vLLM's engine core, each worker, the front end)."""

    config: AttentionPackConfig | None = None  # the settings in force, as last seen
    building_runner: Any = None                # the model runner creating its metadata builders
    pool_bytes: int = 0                        # bytes this process's slot pools took
    row_allocators: dict = field(default_factory=dict)  # (plan, slots) -> the layers' RowAllocator


STATE = ProcessState()


def config_from_vllm(vllm_config: Any) -> AttentionPackConfig:
    """Validated settings from `--additional-config '{"attentionpack": {...}}'`."""
    additional = getattr(vllm_config, "additional_config", None) or {}
    return AttentionPackConfig.from_dict(additional.get(SETTINGS_KEY) if isinstance(additional, dict) else None)


def set_active_config(config: AttentionPackConfig) -> None:
    STATE.config = config


def active_config(vllm_config: Any | None) -> AttentionPackConfig:
    """The settings in force: from the current vLLM config, else the ones seen last."""
    if vllm_config is not None and getattr(vllm_config, "model_config", None) is not None:
        set_active_config(config_from_vllm(vllm_config))
    if STATE.config is None:
        raise RuntimeError("AttentionPack settings are not known in this process yet: "
                           "no vLLM config has been seen")
    return STATE.config


def plan_for(vllm_config: Any | None, num_kv_heads: int, head_size: int) -> CompressionPlan:
    """The compression plan of a layer of the served model: image bases only for a multimodal
    model, and each modality's planes no larger than its tokens in one request (measured at
    start-up and shipped with the config: `shipped_request_tokens`).

    With no model config in sight the slots hold image bases: the larger slot is never
    wrong, and a record's width does not depend on it."""
    return model_plan(active_config(vllm_config), getattr(vllm_config, "model_config", None),
                      num_kv_heads, head_size, shipped_request_tokens(vllm_config))


def model_plan(config: AttentionPackConfig, model_config: Any | None, num_kv_heads: int, head_size: int,
               bounds: RequestTokens) -> CompressionPlan:
    """The plan of a layer of `model_config`'s model (None: unknown, image bases kept) with
    these settings, KV geometry and request-token bounds; the start-up's byte accounting
    (`engine_setup.memory_report`) and the layers (`plan_for`) both build it here."""
    has_image = model_config is None or bool(model_config.is_multimodal_model)
    return CompressionPlan.build(config, num_kv_heads, head_size, has_image=has_image, request_tokens=bounds)


def ship_request_tokens(args: Any, bounds: RequestTokens) -> None:
    """Put the start-up's `token_bounds.request_tokens` into the engine arguments'
    `additional_config`, which vLLM hands to the engine core and every worker. (A worker
    cannot measure them itself: while its layers are built, its model config names the
    language model, which has no multimodal processor.)"""
    args.additional_config = {**(args.additional_config or {}),
                              REQUEST_TOKENS_KEY: {"text": bounds.text, "image": bounds.image}}


def shipped_request_tokens(holder: Any | None) -> RequestTokens:
    """The bounds `ship_request_tokens` stored (EngineArgs or VllmConfig); none if absent."""
    additional = getattr(holder, "additional_config", None) or {}
    shipped = additional.get(REQUEST_TOKENS_KEY) if isinstance(additional, dict) else None
    return RequestTokens(**shipped) if shipped else RequestTokens()


def ship_row_pool(args: Any, arena_rows: int) -> None:
    """Put the start-up's arena size (rows per layer, the zero row included) where the engine
    core and every worker find it, as `ship_request_tokens` does."""
    args.additional_config = {**(args.additional_config or {}), ROW_POOL_KEY: int(arena_rows)}


def shipped_row_pool(holder: Any | None) -> int | None:
    """The arena rows `ship_row_pool` stored; None when the start-up did not bound them."""
    additional = getattr(holder, "additional_config", None) or {}
    rows = additional.get(ROW_POOL_KEY) if isinstance(additional, dict) else None
    return int(rows) if rows is not None else None


def num_request_slots(vllm_config: Any) -> int:
    """One slot per request the scheduler may run at once."""
    return int(vllm_config.scheduler_config.max_num_seqs)


# --- which request is in which batch row ------------------------------------

def set_building_runner(runner: Any) -> None:
    """Called by the glue while a model runner creates its metadata builders."""
    STATE.building_runner = runner


def current_runner() -> Any:
    return STATE.building_runner


def runner_slots(runner: Any, num_slots: int) -> RequestSlots:
    slots = getattr(runner, "_attentionpack_slots", None)
    if slots is None:
        slots = RequestSlots(num_slots)
        runner._attentionpack_slots = slots
    return slots


def release_requests(runner: Any, request_ids) -> None:
    """Finished or preempted requests give back their slots and those slots' arena rows."""
    slots = getattr(runner, "_attentionpack_slots", None)
    if slots is not None and request_ids:
        for slot in slots.release(request_ids):
            for allocator in STATE.row_allocators.values():
                allocator.release(slot)


def slots_for_rows(runner: Any, req_idx: Any, num_reqs: int) -> list[int] | None:
    """Slot of every batch row; None when the rows belong to no request (profiling runs).

    Model Runner V2 gives a stable per-request index (`req_idx`); the legacy runner
    names its rows in `input_batch.req_ids`.
    """
    if req_idx is not None:
        return [int(i) for i in req_idx[:num_reqs]]
    if runner is None:
        raise RuntimeError("AttentionPack cannot name the batch's requests: its model-runner "
                           "hook was not installed (is the attentionpack plugin registered?)")
    req_ids = list(runner.input_batch.req_ids[:num_reqs])
    if len(req_ids) < num_reqs or any(r is None for r in req_ids) or not num_reqs:
        return None
    slots = runner_slots(runner, int(runner.scheduler_config.max_num_seqs))
    return [slots.slot_for(r) for r in req_ids]


# --- memory -------------------------------------------------------------------

def register_pool_bytes(nbytes: int) -> None:
    STATE.pool_bytes += nbytes


def pool_bytes() -> int:
    return STATE.pool_bytes


def arena_rows(vllm_config: Any | None, plan: CompressionPlan, num_slots: int) -> int:
    """Rows of each layer's arena, the zero row included: what the start-up shipped, else
    every slot's full rows."""
    from .row_pool import full_request_rows
    return shipped_row_pool(vllm_config) or 1 + num_slots * full_request_rows(plan)


def row_allocator(plan: CompressionPlan, num_slots: int, device: Any, vllm_config: Any | None):
    """The `row_pool.RowAllocator` of `plan`'s layers in this process (made once, shared by
    the layers and the metadata builder), over `arena_rows` rows."""
    from .row_pool import RowAllocator
    key = (plan, num_slots)   # one device per process
    if key not in STATE.row_allocators:
        rows = arena_rows(vllm_config, plan, num_slots)
        STATE.row_allocators[key] = RowAllocator.empty(plan, num_slots, rows, device)
    return STATE.row_allocators[key]


# --- decode implementation ----------------------------------------------------

def decode_kernel_name(config: AttentionPackConfig, device: Any, dtype: Any = None) -> str:
    """The decode implementation in force: "triton" on CUDA; on CPU "cpu" (the compiled
    kernel) where it builds and stores the cache's format, else "torch"; or what
    `decode_kernel` forces. `dtype`: the model's (None: not known).

    Raises ValueError for a forced "cpu" on a GPU, where the kernel cannot be built, or
    for a float16 cache in 16-bit storage (the kernel stores int8, float32 or bfloat16)."""
    choice, on_cuda = config.decode_kernel, str(device).startswith("cuda")
    if choice == "triton" or (choice == "auto" and on_cuda):
        return "triton"
    if choice == "torch":
        return "torch"
    reason = cpu_kernel_unavailable(config, dtype)
    if choice == "auto":
        return "torch" if reason else "cpu"
    if on_cuda:
        raise ValueError(f"decode_kernel 'cpu' runs on the CPU only, not on {device}; "
                         "use 'auto' or 'triton'")
    if reason:
        raise ValueError(f"decode_kernel 'cpu' is unavailable here: {reason}")
    return "cpu"


def cpu_kernel_unavailable(config: AttentionPackConfig, dtype: Any = None) -> str | None:
    """Why the compiled CPU decode kernel cannot decode this cache, or None."""
    from .kernels import cpu_library
    reason = cpu_library.unavailable_reason()
    if reason is None and config.storage != "int8" and dtype is not None and dtype not in cpu_library.STORAGE_CODES:
        reason = (f"it stores int8, float32 or bfloat16 rows, not {dtype} (storage 'auto' keeps the "
                  "model's dtype; storage 'int8' or --dtype bfloat16 run it)")
    return reason


def decode_attention_for(name: str) -> Callable:
    """The latent-space decode function of a `decode_kernel_name` result."""
    if name == "triton":
        from .kernels.latent_decode_triton import latent_decode_attention_triton
        return latent_decode_attention_triton
    if name == "cpu":
        from .kernels.latent_decode_cpu import latent_decode_attention_cpu
        return latent_decode_attention_cpu
    from .kernels.latent_decode_torch import latent_decode_attention
    return latent_decode_attention


def prefill_attention_for(device: Any) -> Callable:
    """Exact prefill attention: vLLM's own CPU kernel on CPU when the build has it, else
    PyTorch SDPA (`prefill.causal_attention`)."""
    from . import cpu_attention
    from .prefill import causal_attention

    if str(device).startswith("cpu") and cpu_attention.available():
        return cpu_attention.causal_attention_vllm_cpu
    return causal_attention
