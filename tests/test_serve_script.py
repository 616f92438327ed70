"""The README's main job: `bash scripts/serve.sh` serves SmolLM2 with AttentionPack over HTTP."""
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from attentionpack_vllm.local_server import free_port

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parent.parent


def test_serve_script_answers_chat_with_attentionpack(smollm2, tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", "scripts/serve.sh"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PORT": str(port)}, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 420
        while True:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()[-4000:]
                time.sleep(1)
        body = {"model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 24,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:
            answer = json.loads(r.read())["choices"][0]["message"]["content"]
        assert "Paris" in answer
        log = log_path.read_text()
        assert "Using AttentionPack attention backend" in log and "AttentionPack KV cache:" in log
        assert "curl -s http://127.0.0.1" in log  # it tells the user how to query it
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
