"""vLLM general-plugin entry point: registers the backend and its few engine hooks.

vLLM calls `register()` in every process (API server, engine core, workers), so it
is idempotent, cheap, and imports vLLM only inside the call. Each hook is installed
at most once per process, and only where its module is already loaded: a worker
patches the model runner, the engine core patches capacity reporting and the
scheduler's row reservations, and every process patches the engine-args check.

Hooks:
- `--attention-backend attentionpack` (any case) or `CUSTOM` selects the backend;
  on CPU the platform otherwise swaps any choice for CPU_ATTN.
- Engine args: the settings are validated and conflicting features refused before
  anything starts; prefix caching is switched off; multimodal models get their
  image ranges into the attention metadata; the row pool is sized against the KV cache
  budget (at most `max_pool_fraction` of it).
- Model runner (installed in workers): the runner's request ids name the batch rows, and finished or
  preempted requests give their slots back.
- Capacity: the log states AttentionPack's bytes and capacity next to vLLM's own line.
- Scheduler: each request's rows are reserved with its pages (admission.py).
"""
from __future__ import annotations

import functools
import sys

BACKEND_PATH = "attentionpack_vllm.backend.AttentionPackBackend"
BACKEND_ALIAS = "ATTENTIONPACK"
_PATCHED = "_attentionpack_patched"


def register() -> None:
    """Register the AttentionPack attention backend with vLLM (idempotent)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    # An alias of CUSTOM (not a new member) survives pickling into spawned processes.
    AttentionBackendEnum._member_map_.setdefault(BACKEND_ALIAS, AttentionBackendEnum.CUSTOM)
    _patch_cpu_platform()
    _patch_engine_args()
    _patch_capacity_report()
    _patch_scheduler()
    if "vllm.v1.worker.gpu_model_runner" in sys.modules:
        install_worker_hooks()


def install_worker_hooks() -> None:
    """Hooks on the model runner and workers; also called when a layer is built, so
    they are in place in worker processes whatever vLLM had imported at plugin load."""
    import vllm.v1.worker.cpu_worker  # noqa: F401
    import vllm.v1.worker.gpu_model_runner  # noqa: F401
    import vllm.v1.worker.gpu_worker  # noqa: F401

    _patch_model_runner()
    _patch_worker_budgets()


def is_selected(backend) -> bool:
    """Whether an --attention-backend value selects AttentionPack."""
    from vllm.config.attention import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if backend is None:
        return False
    member = AttentionConfig.validate_backend_before(backend)
    return member is AttentionBackendEnum.CUSTOM and \
        AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH


def _patch_once(owner, name: str, make_wrapper) -> None:
    original = getattr(owner, name)
    if getattr(original, _PATCHED, False):
        return
    wrapper = make_wrapper(original)
    setattr(wrapper, _PATCHED, True)
    setattr(owner, name, wrapper)


def _patch_cpu_platform() -> None:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    def make(original):
        func = original.__func__

        @functools.wraps(func)
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            if selected_backend is AttentionBackendEnum.CUSTOM and not attn_selector_config.use_mla:
                return AttentionBackendEnum.CUSTOM.get_path()
            return func(cls, selected_backend, attn_selector_config, num_heads)
        return classmethod(get_attn_backend_cls)

    _patch_once(CpuPlatform, "get_attn_backend_cls", make)


def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def make(original):
        @functools.wraps(original)
        def create_model_config(self):
            model_config = original(self)
            backend = self.attention_backend or getattr(self.attention_config, "backend", None)
            if is_selected(backend):
                from .engine_setup import prepare_engine
                prepare_engine(self, model_config)
            return model_config
        return create_model_config

    _patch_once(EngineArgs, "create_model_config", make)

    def make_max_num_seqs(original):
        # vLLM resolves max_num_seqs here and builds the scheduler config next: the one place
        # to size the row pool for the engine core and the workers alike.
        @functools.wraps(original)
        def set_default_max_num_seqs(self, usage_context, model_config, *args, **kwargs):
            result = original(self, usage_context, model_config, *args, **kwargs)
            if is_selected(self.attention_backend or getattr(self.attention_config, "backend", None)):
                from .engine_setup import size_slot_pools
                size_slot_pools(self, model_config)
            return result
        return set_default_max_num_seqs

    _patch_once(EngineArgs, "_set_default_max_num_seqs_and_batched_tokens_args", make_max_num_seqs)


def _patch_model_runner() -> None:
    module = sys.modules.get("vllm.v1.worker.gpu_model_runner")
    if module is None:
        return
    from . import runtime

    runner_cls = module.GPUModelRunner

    def make_init_builders(original):
        @functools.wraps(original)
        def initialize_metadata_builders(self, *args, **kwargs):
            runtime.set_building_runner(self)
            try:
                return original(self, *args, **kwargs)
            finally:
                runtime.set_building_runner(None)
        return initialize_metadata_builders

    def make_update_states(original):
        @functools.wraps(original)
        def _update_states(self, scheduler_output, *args, **kwargs):
            gone = set(scheduler_output.finished_req_ids)
            gone |= set(getattr(scheduler_output, "preempted_req_ids", None) or ())
            runtime.release_requests(self, gone)
            return original(self, scheduler_output, *args, **kwargs)
        return _update_states

    _patch_once(runner_cls, "initialize_metadata_builders", make_init_builders)
    _patch_once(runner_cls, "_update_states", make_update_states)


def take_pools_out(available: int) -> int:
    """The KV cache budget left for records once the slot pools are taken out of it."""
    from . import runtime

    pools = runtime.pool_bytes()
    if not pools:
        return available
    from vllm.logger import init_logger
    init_logger("vllm.attentionpack").info(
        "AttentionPack slot pools take %d bytes of the %d-byte KV cache budget", pools, available)
    if pools >= available:
        raise ValueError(
            f"AttentionPack's per-request slot pools ({pools} bytes for max_num_seqs "
            f"requests) do not fit the KV cache budget ({available} bytes); raise "
            "--kv-cache-memory-bytes or lower --max-num-seqs")
    return available - pools


def gpu_budget(cache_config, available: int) -> int:
    """A worker's budget (GPU or CPU): pools out of a set one, a profiled one as it is."""
    return take_pools_out(available) if cache_config.kv_cache_memory_bytes else available


def _patch_worker_budgets() -> None:
    """AttentionPack and dense compare within the same bytes: where the KV cache budget is
    set rather than profiled (`--kv-cache-memory-bytes`; on CPU also
    `VLLM_CPU_KVCACHE_SPACE`, which vLLM turns into it), the slot pools come out of it.
    A profiled budget already counts them: they are allocated with the weights, before
    the GPU profile run or the CPU worker's memory reading."""
    def patch(module_name: str, class_name: str, budget) -> None:
        module = sys.modules.get(module_name)
        if module is None:
            return

        def make(original):
            @functools.wraps(original)
            def determine_available_memory(self):
                return budget(self, original(self))
            return determine_available_memory

        _patch_once(getattr(module, class_name), "determine_available_memory", make)

    patch("vllm.v1.worker.cpu_worker", "CPUWorker",
          lambda worker, available: gpu_budget(worker.cache_config, available))
    patch("vllm.v1.worker.gpu_worker", "Worker",
          lambda worker, available: gpu_budget(worker.cache_config, available))


def _patch_capacity_report() -> None:
    module = sys.modules.get("vllm.v1.engine.core")
    if module is None or not hasattr(module, "update_kv_cache_capacity"):
        return

    def make(original):
        @functools.wraps(original)
        def update_kv_cache_capacity(vllm_config, kv_cache_config):
            original(vllm_config, kv_cache_config)
            if is_selected(vllm_config.attention_config.backend):
                from .engine_setup import log_capacity
                log_capacity(vllm_config)
        return update_kv_cache_capacity

    _patch_once(module, "update_kv_cache_capacity", make)


def _patch_scheduler() -> None:
    """The scheduler reserves each request's arena rows with its pages (admission.py):
    `Scheduler.__init__` attaches the reservations to its KV cache manager when
    AttentionPack serves, and the manager's `allocate_slots` / `free` reserve and give
    back rows around the pages. (vLLM has no hook for a second per-request resource.)"""
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    from .admission import admission_of, attach

    def make_init(original):
        @functools.wraps(original)
        def __init__(self, vllm_config, *args, **kwargs):
            original(self, vllm_config, *args, **kwargs)
            if is_selected(vllm_config.attention_config.backend):
                attach(self)
        return __init__

    def make_allocate(original):
        @functools.wraps(original)
        def allocate_slots(self, request, num_new_tokens, num_new_computed_tokens=0, *args, **kwargs):
            admission = admission_of(self)
            if admission is None:
                return original(self, request, num_new_tokens, num_new_computed_tokens, *args, **kwargs)
            extra = num_new_computed_tokens + kwargs.get("num_external_computed_tokens", 0)
            if not admission.reserve(request, num_new_tokens, extra):
                return None  # as when pages run out: the request waits, or vLLM preempts
            blocks = original(self, request, num_new_tokens, num_new_computed_tokens, *args, **kwargs)
            if blocks is None:
                admission.rows.undo_last()
            return blocks
        return allocate_slots

    def make_free(original):
        @functools.wraps(original)
        def free(self, request):
            admission = admission_of(self)
            if admission is not None:
                admission.rows.release(request.request_id)
            return original(self, request)
        return free

    _patch_once(Scheduler, "__init__", make_init)
    _patch_once(KVCacheManager, "allocate_slots", make_allocate)
    _patch_once(KVCacheManager, "free", make_free)
