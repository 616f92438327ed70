"""HTTP end to end: `vllm serve --attention-backend attentionpack` under concurrent load."""
import asyncio
import base64
import io
import json
import urllib.request

import aiohttp
import pytest

from llm_worker import sample_image
from attentionpack_vllm.local_server import vllm_server

pytestmark = pytest.mark.vllm

SERVE_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "16",
              "--kv-cache-memory-bytes", str(64 * 1024 * 1024), "--enforce-eager", "--seed", "0"]
# Float64 factorisations: full rank equals dense token for token (see test_vllm_llm.FULL_RANK).
FULL_RANK = {"attentionpack": {"rank": 100000, "partial_rank_values": False, "window_size": 6, "storage": "auto",
                               "svd": "gram"}}
TEXT = "The quick brown fox jumps over the lazy dog. The capital of France is Paris. "


def image_url(seed: int) -> str:
    buffer = io.BytesIO()
    sample_image(seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(seed: int, max_tokens: int, stream: bool = False) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_url(seed)}},
               {"type": "text", "text": f"Describe picture {seed}."}]
    return {"model": "test-model", "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream, "ignore_eos": True}


def completion_body(i: int, max_tokens: int, stream: bool = False) -> dict:
    return {"model": "test-model", "prompt": TEXT * (1 + i % 5) + f"Item {i}:",
            "max_tokens": max_tokens, "temperature": 0, "stream": stream, "ignore_eos": True}


async def post(session, url: str, body: dict, abort_after_first_chunk: bool = False):
    """Returns the generated text, or None for a request aborted mid-stream."""
    async with session.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        if not body.get("stream"):
            data = await response.json()
            choice = data["choices"][0]
            assert data["usage"]["completion_tokens"] == body["max_tokens"]
            return choice["message"]["content"] if "message" in choice else choice["text"]
        pieces, done = [], False
        async for raw in response.content:
            line = raw.decode().strip()
            if not line:
                continue
            assert line.startswith("data: "), line
            payload = line[len("data: "):]
            if payload == "[DONE]":
                done = True
                break
            choice = json.loads(payload)["choices"][0]
            pieces.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
            if abort_after_first_chunk:
                response.close()  # the client goes away mid-stream
                return None
        assert done, "stream ended without [DONE]"
        return "".join(pieces)


def deterministic_wave():
    return ([("/v1/chat/completions", chat_body(s, 24)) for s in (11, 12)]
            + [("/v1/completions", completion_body(i, 24)) for i in range(4)])


async def run_wave(base: str, requests):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        return await asyncio.gather(*(post(session, base + path, body, abort)
                                      for path, body, abort in requests))


def load_wave():
    """40 concurrent requests: image chats and text completions, streaming or not, 8 aborted."""
    requests = []
    for i in range(16):
        requests.append(("/v1/chat/completions", chat_body(i, 20 + i, stream=i % 2 == 0), False))
        requests.append(("/v1/completions", completion_body(i, 20 + i, stream=i % 2 == 1), False))
    for i in range(8):
        body = chat_body(100 + i, 64, stream=True) if i % 2 else completion_body(100 + i, 64, stream=True)
        requests.append(("/v1/chat/completions" if i % 2 else "/v1/completions", body, True))
    return requests


def test_concurrent_load_aborts_and_dense_equal_second_wave(tiny_llava, tmp_path):
    args = SERVE_ARGS + ["--attention-backend", "attentionpack",
                         "--additional-config", json.dumps(FULL_RANK)]
    with vllm_server(tiny_llava, args, tmp_path / "attentionpack.log") as (base, proc):
        first = asyncio.run(run_wave(base, load_wave()))
        assert all(isinstance(t, str) for t in first[:32])
        assert all(t is None for t in first[32:])
        with urllib.request.urlopen(base + "/health") as r:
            assert r.status == 200
        second = asyncio.run(run_wave(base, [(p, b, False) for p, b in deterministic_wave()]))
        assert proc.poll() is None
        # Read while the server still runs: stopping it (SIGTERM, engine killed without
        # a grace period) can make vLLM's output handler log an EngineDeadError traceback
        # of its own, which says nothing about the traffic served.
        log = (tmp_path / "attentionpack.log").read_text()
    assert "Using AttentionPack attention backend" in log and "Traceback" not in log
    with vllm_server(tiny_llava, SERVE_ARGS, tmp_path / "dense.log") as (base, _):
        dense = asyncio.run(run_wave(base, [(p, b, False) for p, b in deterministic_wave()]))
    assert second == dense
