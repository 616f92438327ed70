"""A local `vllm serve` on 127.0.0.1 for tests and benchmarks: start, wait until healthy, stop.

The server's output goes to a log file; the process is stopped however the block exits.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model: Path, args: list[str], log_path: Path, startup_timeout: float = 420,
                served_name: str = "test-model"):
    """Yields (base URL, process) of a running server; stops it on exit."""
    port = free_port()
    vllm_cli = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm_cli), "serve", str(model), "--served-model-name", served_name,
           "--host", "127.0.0.1", "--port", str(port), *args]
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + startup_timeout
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"vllm serve exited ({proc.returncode}):\n"
                                         + log_path.read_text()[-5000:])
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError("vllm serve did not become healthy:\n"
                                         + log_path.read_text()[-5000:])
                time.sleep(1)
            yield url, proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
