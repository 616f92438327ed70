"""benchmarks/factorize_bench.py end to end on tiny shapes (--smoke): torch only, JSON saved."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "factorize_bench.py"


def test_smoke_run_writes_results_without_vllm(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads((tmp_path / "factorize_bench_cpu_smoke.json").read_text())
    assert result["vllm_imported"] is False and result["package_imported"] is False
    assert result["command"] and result["date"] and result["device"].startswith("CPU")
    assert result["auto_method"] == "gram32"
    cases = {(r["case"], r["method"]) for r in result["rows"]}
    assert cases == {(c, m) for c in ("compress", "paper_sample", "fold") for m in ("exact", "gram", "gram32", "randomized")}
    for row in result["rows"]:
        assert row["ms_median"] > 0
        ratio = row.get("energy_ratio", row.get("energy_ratio_image"))
        if ratio is not None:
            assert 0.9 < ratio <= 1 + 1e-6, row
    assert "compress" in out.stdout and "saved" in out.stdout


def test_time_budget_stops_after_the_running_configuration(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--out", str(tmp_path),
                          "--cases", "fold", "--methods", "gram", "--max-seconds", "0.001"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads((tmp_path / "factorize_bench_cpu_smoke.json").read_text())
    assert [(r["case"], r["method"], r["width"], r["batch"]) for r in result["rows"]] == [("fold", "gram", 128, 1)]
    assert "time budget" in result["stopped"]
