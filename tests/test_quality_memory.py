"""benchmarks/quality_memory.py on the committed quality runs: every row's bytes are
recomputed from its settings, and must equal what the run itself recorded."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "quality_memory.py"
RESULTS = REPO / "benchmarks" / "results"
MIB = 1024 * 1024


def test_points_match_the_bytes_each_run_recorded(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "qm")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "qm.json").read_text())
    assert (tmp_path / "qm.png").stat().st_size > 0
    points = {(p["source"], p["setting"]): p for p in result["points"]}
    checked = 0
    for source in result["sources"]:
        run = json.loads((RESULTS / source).read_text())
        for row in run["settings"]["rows"]:
            recorded = row.get("kv_bytes_per_request_bf16")
            if recorded is not None:   # runs since the storage sweep record bf16 bytes
                assert points[(source, row["setting"])]["kv_mib_bf16"] == pytest.approx(recorded / MIB, rel=1e-12)
                checked += 1
    assert checked >= 10
    # Runs from before the storage setting existed are read as 16-bit storage.
    assert points[("quality.json", "r64")]["storage"] == "auto"
    assert points[("quality.json", "r64")]["kv_mib_bf16"] == points[("quality_storage.json", "r64")]["kv_mib_bf16"]
    assert points[("quality.json", "dense")]["ppl_ratio_to_dense"] == 1.0
    # Today's defaults are marked where a run measured them, and only there.
    defaults = [key for key, p in points.items() if p["is_today_default"]]
    assert defaults == [("quality_policy.json", "r80 int8")]


def test_missing_results_are_a_named_error(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--results", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--results: none of" in done.stderr
