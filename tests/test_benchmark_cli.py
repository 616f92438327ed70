"""Benchmark scripts refuse bad arguments with a message that names the option."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script, args, message", [
    ("serving_throughput.py", ["--image-size", "0"], "--image-size must be a positive"),
    ("serving_throughput.py", ["--settings", "[1]"], "--settings must be a JSON object"),
    ("serving_throughput.py", ["--settings", "{rank: 8"], "--settings must be a JSON object"),
    ("serving_throughput.py", ["--mix", "audio"], "invalid choice: 'audio'"),
    ("serving_throughput.py", ["--dtype", "int8"], "invalid choice: 'int8'"),
    ("quality.py", ["--parts", "ppl,speed"], "unknown parts ['speed']"),
    ("quality.py", ["--passkeys", "1k"], "--passkeys: expected comma-separated token counts"),
    ("quality.py", ["--passkeys", "0"], "--passkeys: expected positive token counts"),
    ("quality.py", ["--sweep", "storage", "--only", "r64 fp4"], "--only: unknown settings ['r64 fp4']"),
    ("quality.py", ["--sweep", "policy", "--only", "r64 int4"], "--only: unknown settings ['r64 int4']"),
    ("quality.py", ["--sweep", "ranks"], "invalid choice: 'ranks'"),
    ("decode_step_cpu.py", ["--storage", "auto,fp8"], "--storage: expected a comma-separated list"),
    ("decode_step_cpu.py", ["--kernels", "torch,cuda"], "--kernels: expected a comma-separated list of torch, cpu"),
    ("decode_step_cpu.py", ["--settings", "[1]"], "--settings must be a JSON object"),
    ("decode_step_cpu.py", ["--settings", '{"rank": 0}'], "--settings: attentionpack setting 'rank"),
    ("engine_profile.py", ["--max-num-seqs", "0"], "--max-num-seqs must be at least 1, got 0"),
    ("engine_profile.py", ["--mix", "image"], "argument --mix: invalid choice: 'image'"),
    ("engine_profile.py", ["--settings", "[1]"], "--settings must be a JSON object"),
    ("engine_profile.py", ["--settings", '{"rank": 0}'], "--settings: attentionpack setting 'rank"),
    ("row_allocator_step.py", ["--batches", "24,many"], "--batches must be comma-separated integers"),
    ("row_allocator_step.py", ["--batches", "0"], "--batches and --steps must be at least 1"),
    ("serving_tradeoff.py", ["--plot"], "unrecognized arguments: --plot"),
])
def test_bad_arguments_exit_with_a_named_error(script, args, message):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr


def test_row_allocator_step_times_a_step_and_saves_it(tmp_path):
    """A short run prints each batch's time and writes the results file it names."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "row_allocator_step.py"), "--batches", "3",
                           "--steps", "5", "--tag", "cli_test"], cwd=REPO, capture_output=True, text=True, timeout=120)
    out = REPO / "benchmarks" / "results" / "row_allocator_step_cli_test.json"
    try:
        assert done.returncode == 0, done.stderr
        assert "batch 3:" in done.stdout
        rows = json.loads(out.read_text())["rows"]
        assert [r["batch"] for r in rows] == [3] and rows[0]["median_us"] > 0
    finally:
        out.unlink(missing_ok=True)
