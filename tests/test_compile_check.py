"""The decode kernels compile for an H100 (sm_90) without a GPU, without spilling registers.

Runs benchmarks/compile_check.py (Triton's NVIDIA backend and the ptxas it ships; no GPU)
on the half-precision configurations, the ones that matter for speed.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton

REPO = Path(__file__).resolve().parent.parent


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no NVIDIA backend with ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compile.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compile_check.py"), "--only", "fp16",
                           "--json", str(out)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_project_queries", "_latent_pass", "_combine", "_probs_pass", "_dense_pass", "_dense_combine"}
    for row in rows:
        assert row["ok"], row
        assert not row["local_bytes"] and not row["stack_bytes"], f"spills: {row}"
        assert row["registers"] <= 255
