"""AttentionPack on vLLM's distributed engine: two workers on this 2-core CPU.

- tensor parallel 2, multiprocessing executor: full rank gives dense's greedy tokens;
  each worker compresses its own shard of the KV heads and says so in the log;
  finished and aborted requests free their slots on every worker;
- pipeline parallel 2: the same, each worker with the layers of its stage;
- the Ray executor serving HTTP (vLLM's CPU build refuses Ray: xfail with its error).

vLLM's CPU workers bind their OpenMP threads to NUMA nodes; this machine has one, so
two workers need explicit core lists (`VLLM_CPU_OMP_THREADS_BIND="0|1"`).

This file is also the script each engine runs in, in a fresh process:
`python test_tensor_parallel.py SPEC.json RESULT.json` (see `main`).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Clamped per shard; float64 factorisations, where full rank equals dense token for token.
FULL_RANK = {"rank": 100_000, "partial_rank_values": False, "window_size": 8, "storage": "auto", "svd": "gram"}
KV_BYTES = 64 * 1024 * 1024
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=4, seed=0,
              kv_cache_memory_bytes=KV_BYTES, max_num_batched_tokens=64, block_size=32)
TEXT = ("The quick brown fox jumps over the lazy dog. A large language model reads a prompt one "
        "token at a time and keeps the keys and values of every token it has seen in a cache. ")
# Six requests through four slots: each worker must free finished requests' slots.
REQUESTS = [{"prompt": TEXT[:n], "max_tokens": 24} for n in (12, 40, 90, 130, len(TEXT))] + \
    [{"prompt": TEXT * 3, "max_tokens": 24}]
RAY_ERROR = "current platform cpu does not support ray"


def two_core_env() -> dict:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("two workers need two cores")
    return {"VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[1]}",
            # collective_rpc sends `worker_state` (a function) to the workers
            "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}


def engine(parallel: dict, attentionpack: bool, **extra) -> dict:
    spec = {**ENGINE, **parallel, **extra}
    if attentionpack:
        spec.update(attention_backend="attentionpack",
                    additional_config={"attentionpack": FULL_RANK})
    return spec


def run(model, engine_spec: dict, abort: bool = False, timeout: int = 600) -> dict:
    """Runs `main` in a fresh process; returns its result plus the log."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"model": str(model), "engine": engine_spec,
                                    "requests": REQUESTS, "abort": abort}))
        env = {**os.environ, **two_core_env(), "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        start = time.monotonic()
        proc = subprocess.run([sys.executable, __file__, str(spec), str(result)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"vLLM run failed ({proc.returncode}):\n{log[-8000:]}"
        data = json.loads(result.read_text())
    return {**data, "log": log, "seconds": time.monotonic() - start}


def log_ints(pattern: str, log: str) -> list[int]:
    found = [int(m.replace(",", "")) for m in re.findall(pattern, log)]
    assert found, f"no line matching {pattern!r} in the vLLM log"
    return found


@pytest.fixture(scope="module")
def dense_tp2(tiny_llama):
    return run(tiny_llama, engine({"tensor_parallel_size": 2}, attentionpack=False))


@pytest.fixture(scope="module")
def packed_tp2(tiny_llama):
    return run(tiny_llama, engine({"tensor_parallel_size": 2}, attentionpack=True), abort=True)


class FakeModelConfig:
    """The two ModelConfig reads WorkerShape makes."""

    def __init__(self, kv_heads: int, layers: int):
        self.kv_heads = kv_heads
        self.hf_text_config = type("Text", (), {"num_hidden_layers": layers})

    def get_total_num_kv_heads(self) -> int:
        return self.kv_heads


def parallel(tp: int, pp: int = 1):
    return type("Parallel", (), {"tensor_parallel_size": tp, "pipeline_parallel_size": pp})


def test_worker_shape_shards_heads_and_splits_layers_like_vllm():
    from attentionpack_vllm.parallel import WorkerShape

    single = WorkerShape.of(FakeModelConfig(8, 30))
    assert (single.workers, single.kv_heads, single.worker_layers) == (1, 8, 30)
    tp = WorkerShape.of(FakeModelConfig(8, 30), parallel(4))
    assert (tp.workers, tp.kv_heads, tp.replicated, tp.stage_layers) == (4, 2, False, (30,))
    # More workers than KV heads: vLLM replicates one head on each.
    assert (WorkerShape.of(FakeModelConfig(2, 30), parallel(4)).kv_heads,
            WorkerShape.of(FakeModelConfig(2, 30), parallel(4)).replicated) == (1, True)
    # 30 layers over 4 stages: vLLM gives the middle stages the remainder.
    pp = WorkerShape.of(FakeModelConfig(8, 30), parallel(2, 4))
    assert pp.stage_layers == (7, 8, 8, 7) and pp.worker_layers == 8 and pp.workers == 8


def test_worker_shape_totals_count_every_worker_once():
    from attentionpack_vllm.parallel import WorkerShape

    shape = WorkerShape.of(FakeModelConfig(4, 3), parallel(2, 2))  # stages of 1 and 2 layers
    # A per-worker, per-layer figure, over 2 shards x (1 + 2) layers.
    assert shape.total(10) == 10 * 2 * 3
    report = type("Report", (), {"record_bytes": 10, "dense_token_bytes": 40, "slot_bytes": 100})
    line = shape.describe_capacity(report, tokens=5, pool_bytes_per_layer=200)
    assert "5 tokens in 300 bytes of records plus 1200 bytes of slot pools (1500 bytes" in line
    plan = type("Plan", (), {"kv_width": 128})
    first, second = WorkerShape.of(FakeModelConfig(1, 3), parallel(2)).describe(report, plan)
    assert "its own shard, 1 of 1 KV heads (replicated: tensor parallel 2 > 1 KV heads)" in first
    assert "keeps up to 2x the directions" in first
    assert "30 per worker (3 layers; dense 120), 60 on all 2 workers (dense 240)" in second


@pytest.mark.vllm
def test_tp2_full_rank_matches_dense_greedy_tokens(dense_tp2, packed_tp2):
    assert "Using AttentionPack attention backend" in packed_tp2["log"]
    assert [w["rank"] for w in packed_tp2["workers_after_generate"]] == [0, 1]
    assert packed_tp2["token_ids"] == dense_tp2["token_ids"]
    assert len(packed_tp2["token_ids"]) == len(REQUESTS)
    # After the aborts, a full batch (every slot at once) still gives dense's tokens.
    assert packed_tp2["token_ids_after_abort"] == dense_tp2["token_ids"][:ENGINE["max_num_seqs"]]


@pytest.mark.vllm
def test_tp2_each_worker_compresses_its_own_shard(packed_tp2):
    """The tiny Llama has 2 KV heads of 32: each worker holds one, and full rank is 32 there."""
    log = packed_tp2["log"]
    for worker in packed_tp2["workers_after_generate"]:
        assert worker["kv_heads"] == [1] and worker["kv_width"] == [32] and worker["layers"] == 2
        assert worker["ranks"] == [[32, 32]]
    assert "record = K' 32 + V' 32" in log
    assert ("each worker compresses its own shard, 1 of 2 KV heads (heads concatenated within "
            "the shard: width 32), in 2 layers; ranks apply per shard") in log
    # Per-worker and total bytes: the startup accounting is the workers' own.
    per_worker_pools = {w["pool_bytes"] for w in packed_tp2["workers_after_generate"]}
    assert len(per_worker_pools) == 1 and min(per_worker_pools) > 0
    pools = per_worker_pools.pop()
    assert log_ints(r"AttentionPack slot pools take (\d+) bytes", log) == [pools, pools]
    assert log_ints(r"records plus (\d+) bytes of slot pools for", log) == [pools]
    assert log_ints(r"records plus (\d+) bytes of slot pools \(", log) == [2 * pools]
    record = log_ints(r"bytes per token per layer: (\d+)", log)[0]
    per_worker, total = log_ints(r"bytes per token: (\d+) per worker", log)[0], \
        log_ints(r"per worker \(2 layers; dense \d+\), (\d+) on all 2 workers", log)[0]
    assert per_worker == 2 * record and total == 2 * per_worker
    # vLLM's capacity is each worker's budget less its pools, paged in whole blocks.
    tokens = log_ints(r"KV cache size: ([\d,]+) tokens", log)[0]
    block = ENGINE["block_size"]
    assert abs(tokens - (KV_BYTES - pools) // (record * 2 * block) * block) <= block
    assert log_ints(r"AttentionPack KV cache: (\d+) tokens", log) == [tokens]


@pytest.mark.vllm
def test_tp2_finished_and_aborted_requests_free_slots_on_every_worker(packed_tp2):
    """Six finished requests went through four slots; then three long requests ran, two
    were aborted, then the third: each worker held what ran and ends with every slot free."""
    running = packed_tp2["workers_while_running"]
    assert [w["held"] for w in running] == [3, 3]
    assert [w["held"] for w in packed_tp2["workers_after_two_aborts"]] == [1, 1]
    for state in ("workers_after_generate", "workers_after_abort", "workers_at_end"):
        workers = packed_tp2[state]
        assert [(w["held"], w["free"]) for w in workers] == [(0, 4), (0, 4)], (state, workers)


PP2 = {"pipeline_parallel_size": 2}
# vLLM's CPU runner allocates pipeline stages' intermediate tensors only in its compile
# warm-up; with --enforce-eager the second stage fails on the first request (dense too):
# `assert self.intermediate_tensors is not None` (gpu_model_runner.py,
# sync_and_gather_intermediate_tensors). Pipeline parallelism therefore runs compiled;
# Dynamo tracing without Inductor (mode 2, backend eager) is the quickest to start.
PP2_ENGINE = dict(enforce_eager=False, compilation_config={"mode": 2, "backend": "eager"})


@pytest.mark.vllm
def test_pp2_full_rank_matches_dense_each_stage_with_its_layers(tiny_llama, dense_tp2):
    packed = run(tiny_llama, engine(PP2, attentionpack=True, **PP2_ENGINE))
    # Same arithmetic as one worker, split by layers; dense at TP=2 gives the same tokens.
    assert packed["token_ids"] == dense_tp2["token_ids"]
    assert [w["layers"] for w in packed["workers_after_generate"]] == [1, 1]
    assert all(w["kv_heads"] == [2] and w["held"] == 0 for w in packed["workers_after_generate"])
    assert ("(tensor parallel 1 x pipeline parallel 2): each worker compresses all 2 KV heads "
            "(width 64), in the layers of its pipeline stage (1/1)\n") in packed["log"]
    assert "record = K' 64 + V' 64" in packed["log"]


def complete(base: str, prompt: str, max_tokens: int) -> str:
    import urllib.request

    body = {"model": "test-model", "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    request = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())["choices"][0]["text"]


@pytest.mark.vllm
def test_ray_executor_serves_http(tiny_llama, tmp_path, monkeypatch, request):
    """`vllm serve --distributed-executor-backend ray` at TP=2 answers like the
    multiprocessing executor.

    vLLM's CPU build refuses Ray before any worker starts: `initialize_ray_cluster`
    (vllm/v1/executor/ray_utils.py) raises `ValueError: current platform cpu does not
    support ray.` because the CPU platform has no `ray_device_key`. That check is read
    here rather than waited for (a local Ray cluster takes half a minute to start and
    fail); the full run happens once vLLM's CPU build names a Ray device."""
    import ray  # noqa: F401  (scripts/setup.sh installs it; vLLM's error without it differs)
    from vllm.platforms import current_platform

    if not current_platform.ray_device_key:
        pytest.xfail(f"vLLM's CPU build ({current_platform.device_name}) has no Ray device "
                     f"key: 'ValueError: {RAY_ERROR}.' from initialize_ray_cluster")
    from attentionpack_vllm.local_server import vllm_server

    args = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "4",
            "--kv-cache-memory-bytes", str(KV_BYTES), "--enforce-eager", "--seed", "0",
            "--max-num-batched-tokens", "64", "--block-size", str(ENGINE["block_size"]),
            "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray",
            "--attention-backend", "attentionpack", "--additional-config",
            json.dumps({"attentionpack": FULL_RANK})]
    for name, value in two_core_env().items():
        monkeypatch.setenv(name, value)  # the server inherits the environment
    with vllm_server(tiny_llama, args, tmp_path / "ray.log") as (base, _):
        text = complete(base, REQUESTS[2]["prompt"], REQUESTS[2]["max_tokens"])
        log = (tmp_path / "ray.log").read_text()
    assert "Using AttentionPack attention backend" in log and "Ray" in log
    assert text == request.getfixturevalue("packed_tp2")["texts"][2]


# --- the engine process ---------------------------------------------------------

def worker_state(worker) -> dict:
    """Run in every worker (collective_rpc): its AttentionPack layers and request slots."""
    from attentionpack_vllm import runtime

    runner = worker.model_runner
    slots = getattr(runner, "_attentionpack_slots", None)
    context = runner.vllm_config.compilation_config.static_forward_context
    plans = [layer.impl.plan for layer in context.values()
             if type(getattr(layer, "impl", None)).__name__ == "AttentionPackImpl"]
    return {"rank": worker.rank, "layers": len(plans),
            "kv_heads": sorted({p.num_kv_heads for p in plans}),
            "kv_width": sorted({p.kv_width for p in plans}),
            "ranks": sorted({(p.layout.rank_k, p.layout.rank_v) for p in plans}),
            "pool_bytes": runtime.pool_bytes(),
            "held": None if slots is None else len(slots),
            "free": None if slots is None else slots.num_slots - len(slots)}


def settle(llm, expected_held: int, timeout: float = 30.0) -> list[dict]:
    """Worker states once every worker holds `expected_held` slots (or the last seen).

    Workers learn of finished and aborted requests from the next scheduler output,
    which the engine core sends by itself right after; poll briefly for it."""
    deadline = time.monotonic() + timeout
    while True:
        states = sorted(llm.collective_rpc(worker_state), key=lambda w: w["rank"])
        if all(w["held"] == expected_held for w in states) or time.monotonic() > deadline:
            return states
        time.sleep(0.2)


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], **spec["engine"])
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)  # noqa: E731
    outputs = llm.generate([r["prompt"] for r in spec["requests"]],
                           [greedy(r["max_tokens"]) for r in spec["requests"]], use_tqdm=False)
    result = {"token_ids": [list(o.outputs[0].token_ids) for o in outputs],
              "texts": [o.outputs[0].text for o in outputs]}
    if spec["engine"].get("attention_backend"):
        result["workers_after_generate"] = settle(llm, 0)
    if spec["abort"]:
        engine = llm.llm_engine
        ids = [f"long-{i}" for i in range(3)]
        for i, request_id in enumerate(ids):
            engine.add_request(request_id, TEXT[: 30 + 20 * i], greedy(900))
        produced: dict[str, int] = {}
        while len(produced) < len(ids) or min(produced.values()) < 2:
            for out in engine.step():
                produced[out.request_id] = len(out.outputs[0].token_ids)
        result["workers_while_running"] = settle(llm, len(ids))
        engine.abort_request(ids[:2])
        result["workers_after_two_aborts"] = settle(llm, 1)
        engine.abort_request(ids[2:])
        result["workers_after_abort"] = settle(llm, 0)
        n = spec["engine"]["max_num_seqs"]
        first = spec["requests"][:n]
        again = llm.generate([r["prompt"] for r in first], [greedy(r["max_tokens"]) for r in first],
                             use_tqdm=False)
        result["token_ids_after_abort"] = [list(o.outputs[0].token_ids) for o in again]
        result["workers_at_end"] = settle(llm, 0)
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
