"""benchmarks/kernel_bench.py runs end to end on CPU (--smoke, Triton interpreter)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "kernel_bench.py"


def test_smoke_run_writes_rows_for_every_method(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SMOKE" in done.stdout and "NOT" in done.stdout  # says its times mean nothing

    [path] = tmp_path.glob("kernel_bench_*.json")
    assert "smoke" in path.name
    result = json.loads(path.read_text())
    assert result["smoke"] and result["complete"] and not result["vllm_imported"]
    assert "--smoke" in result["command"] and result["card"] and result["torch"] and result["triton"]
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    assert {r["partial"] for r in rows} == {False, True}
    for row in rows:
        for method in ("ap", "dense_triton", "sdpa"):
            assert row[f"{method}_us"] > 0 and row[f"{method}_bytes"] > 0 and row[f"{method}_gbps"] > 0
        assert row["ap_check_ok"] and row["dense_check_ok"]  # outputs checked against references
    assert (tmp_path / path.name.replace(".json", ".png")).stat().st_size > 0


def test_kernels_load_from_the_repository_folder_without_the_package():
    # The package made unimportable: `load_kernels` must fall back to kernels/ by path.
    code = (
        "import sys; sys.modules['attentionpack_vllm'] = None; sys.path.insert(0, 'benchmarks')\n"
        "from _kernels import FALLBACK_NAME, load_kernels\n"
        "k = load_kernels()\n"
        "assert k.source.startswith(FALLBACK_NAME), k.source\n"
        "assert k.dense_paged_triton.__name__ == FALLBACK_NAME + '.dense_paged_triton'\n"
        "assert callable(k.latent_decode_triton.latent_decode_attention_triton)\n"
        "assert 'vllm' not in sys.modules\n"
        "print('ok', k.source)\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok _attentionpack_kernels" in done.stdout, done.stdout + done.stderr
