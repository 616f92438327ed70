"""Start vLLM for tests: in a fresh process through `llm_worker.py`, logs captured."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent

BASE_ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=8,
                   kv_cache_memory_bytes=64 * 1024 * 1024, seed=0)


@dataclass
class LLMRun:
    token_ids: list[list[int]]
    texts: list[str]
    preemptions: int
    log: str
    returncode: int

    def log_int(self, pattern: str) -> int:
        match = re.search(pattern, self.log)
        assert match, f"no line matching {pattern!r} in the vLLM log"
        return int(match.group(1).replace(",", ""))


def attentionpack_engine(settings: dict | None = None, **engine) -> dict:
    return {**BASE_ENGINE, "attention_backend": "attentionpack",
            "additional_config": {"attentionpack": settings or {}}, **engine}


def dense_engine(**engine) -> dict:
    return {**BASE_ENGINE, **engine}


def run_llm(model: str | Path, engine: dict, requests: list[dict], env: dict | None = None,
            timeout: int = 600, check: bool = True) -> LLMRun:
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"model": str(model), "engine": engine, "requests": requests,
                                    "env": env or {}}))
        proc = subprocess.run([sys.executable, str(HERE / "llm_worker.py"), str(spec), str(result)],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log = proc.stdout + proc.stderr
        if check and proc.returncode != 0:
            raise AssertionError(f"vLLM run failed ({proc.returncode}):\n{log[-6000:]}")
        data = json.loads(result.read_text()) if result.exists() else {}
        return LLMRun(data.get("token_ids", []), data.get("texts", []), data.get("preemptions", 0),
                      log, proc.returncode)
