"""vLLM with slot pools sized against the KV cache budget: max_num_seqs lowered at startup."""
import pytest
import torch

from attentionpack_vllm.config import AttentionPackConfig
from attentionpack_vllm.memory import MemoryReport
from attentionpack_vllm.plan import CompressionPlan
from vllm_harness import attentionpack_engine, run_llm

pytestmark = pytest.mark.vllm

MiB = 1 << 20
# The tiny Llama: 2 layers, 2 KV heads x 32 (width 64), text only, float32, default
# settings (ranks clamped to 64, int8 storage).
TINY_SLOT_BYTES = MemoryReport.of(
    CompressionPlan.build(AttentionPackConfig(), 2, 32, has_image=False), torch.float32).slot_bytes * 2


def expected_slots(budget: int, fraction: float = 0.5) -> int:
    return int(budget * fraction) // TINY_SLOT_BYTES


@pytest.fixture(scope="module")
def registered():
    from attentionpack_vllm import plugin
    plugin.register()
    return plugin


def scheduler_max_num_seqs(model, settings=None, backend="attentionpack", **engine) -> int:
    from vllm.engine.arg_utils import EngineArgs
    args = EngineArgs(model=str(model), attention_backend=backend, dtype="float32",
                      max_model_len=512, enforce_eager=True,
                      additional_config={"attentionpack": settings or {}}, **engine)
    return args.create_engine_config().scheduler_config.max_num_seqs


def test_engine_config_max_num_seqs_follows_the_budget(registered, tiny_llama, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    # Per layer: 2 x 64 basis rows, 2 x 64 window rows and 2 x 4 sink rows of 64 int8
    # bytes plus 2 float32 head scales, and a float32 importance per window and sink row.
    assert TINY_SLOT_BYTES == 2 * ((2 * 64 + 2 * 64 + 2 * 4) * (64 + 2 * 4) + (64 + 4) * 4) == 38_560
    # 1024 slots would take 37.7 MiB: a 16 MiB budget keeps what fits in half of it.
    assert expected_slots(16 * MiB) == 217
    assert scheduler_max_num_seqs(tiny_llama, max_num_seqs=1024, kv_cache_memory_bytes=16 * MiB) == 217
    assert scheduler_max_num_seqs(tiny_llama, {"max_pool_fraction": 0.25}, max_num_seqs=1024,
                                  kv_cache_memory_bytes=16 * MiB) == expected_slots(16 * MiB, 0.25)
    # A budget with room for them keeps all 1024; the dense backend is never touched.
    assert scheduler_max_num_seqs(tiny_llama, max_num_seqs=1024, kv_cache_memory_bytes=1024 * MiB) == 1024
    assert scheduler_max_num_seqs(tiny_llama, backend=None, max_num_seqs=1024,
                                  kv_cache_memory_bytes=16 * MiB) == 1024
    # VLLM_CPU_KVCACHE_SPACE (GiB) wins over the flag, as in vLLM's CPU platform.
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert scheduler_max_num_seqs(tiny_llama, max_num_seqs=1024, kv_cache_memory_bytes=16 * MiB) == 1024


def test_profiled_budget_is_device_memory_times_utilization(registered, tiny_llama, monkeypatch):
    from vllm.platforms import current_platform
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(type(current_platform), "get_device_total_memory",
                        classmethod(lambda cls, device_id=0: 40 * MiB))
    got = scheduler_max_num_seqs(tiny_llama, max_num_seqs=1024, gpu_memory_utilization=0.5)
    assert got == expected_slots(20 * MiB) == 271


def test_1024_seqs_on_a_small_budget_start_with_a_warning_and_serve(tiny_llama):
    """Without the cap, 1024 slots (37.7 MiB of pools) do not fit 16 MiB and the engine
    stops at startup; with it, the engine runs with 217 slots and serves."""
    requests = [{"prompt": f"Request number {i} says hello to the engine", "max_tokens": 12}
                for i in range(6)]
    requests.append(dict(requests[0]))  # the same prompt again: greedy gives the same tokens
    run = run_llm(tiny_llama, attentionpack_engine(
        max_num_seqs=1024, kv_cache_memory_bytes=16 * MiB, max_model_len=512), requests)
    assert "max_num_seqs lowered from 1024 to 217" in run.log
    assert (f"1024 request slots of {TINY_SLOT_BYTES} bytes each (all 2 layers of a worker) "
            f"would take {1024 * TINY_SLOT_BYTES} bytes, more than max_pool_fraction 0.5 of the "
            f"{16 * MiB}-byte KV cache budget (--kv-cache-memory-bytes)") in run.log
    assert run.log_int(r"AttentionPack runs at most (\d+) requests at once") == 217
    # the workers allocated 217 slots per layer, and the capacity line reports them
    assert run.log_int(r"AttentionPack slot pools take (\d+) bytes") == 217 * TINY_SLOT_BYTES
    assert run.log_int(r"slot pools for (\d+) requests") == 217
    assert run.log_int(r"\(slots: (\d+)\)") == 217
    assert "do not fit the KV cache budget" not in run.log and "Traceback" not in run.log
    assert [len(t) for t in run.token_ids] == [12] * len(requests)
    assert run.token_ids[-1] == run.token_ids[0]
