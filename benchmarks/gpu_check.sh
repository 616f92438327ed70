#!/usr/bin/env bash
# GPU check of the decode kernels, for a machine with only torch and triton (no vLLM, no install).
#
#   bash benchmarks/gpu_check.sh                 # on a GPU: about 3 minutes on an H200, capped below 8
#                                                # (the step limits add up to 470 s)
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # on CPU: the same steps at tiny sizes under the interpreter
#
# Steps, each under its own time limit (seconds on a GPU), each run even if an earlier one failed:
#   1. (130) kernel tests on CUDA (tests/test_triton_kernel.py, tests/test_dense_paged_kernel.py) through
#      benchmarks/run_kernel_tests.py (pytest if installed, else its built-in runner)
#   2. (40) the CUDA-graph check (benchmarks/cuda_graph_check.py): capture, replay on new inputs, compare
#   3. (150) benchmarks/kernel_bench.py: LLaVA-1.5-7B and Qwen2-VL-7B geometry, batch 1/64/256, context
#      1000/4000, rank 64 and 80 (the defaults'), partial rank off/on, eager and CUDA-graph timings, plus a tuning sweep
#   4. (90) benchmarks/kernel_bench.py --int8: the AttentionPack cache in int8 storage (dense baselines
#      unchanged), LLaVA-1.5-7B geometry, batch 1/64, context 1000/4000, rank 64 and 80 (the defaults'
#      rank and storage), partial rank off/on
#   5. (60) benchmarks/factorize_bench.py, when the file exists
# Everything goes to $OUT when set, else benchmarks/results/: kernel_tests_<card>.json,
# cuda_graph_check_<card>.json, kernel_bench_<card>.json and kernel_bench_<card>_int8.json (each
# + .png with matplotlib; otherwise `python benchmarks/kernel_bench.py --replot <json>` draws it
# elsewhere), the factorization benchmark's own files, gpu_check_<card>.log (all output) and
# gpu_check_<card>.json (the steps, exit codes and times). Python: $PYTHON, else python3, else python.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac

PY=${PYTHON:-$(command -v python3 || command -v python)}
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  CARD=cpu_dry_run
else
  unset TRITON_INTERPRET
  CARD=$("$PY" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '_', torch.cuda.get_device_name(0)).strip('_'))") || {
    echo "gpu_check: no CUDA device visible to torch (use --cpu-dry-run on CPU)" >&2; exit 2; }
fi
LOG="$DEST/gpu_check_$CARD.log"
SUMMARY="$DEST/gpu_check_$CARD.json"
: > "$LOG"
STEPS=()
START_ALL=$(date +%s)

# step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log everything, remember rc and time.
step() {
  local name=$1 limit=$2; shift 2
  local start rc
  start=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local seconds=$(( $(date +%s) - start ))
  [ "$rc" = 124 ] && echo "=== $name: TIMED OUT after ${limit}s" | tee -a "$LOG"
  echo "=== $name: exit $rc in ${seconds}s" | tee -a "$LOG"
  STEPS+=("$name|$rc|$seconds|$limit|$*")
}

"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import platform, torch, triton
print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
      f"CUDA {torch.version.cuda}, device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}")
EOF

if [ "$DRY" = 1 ]; then
  # the no-install route and the built-in test runner (as on a machine without pytest)
  step kernel_tests 300 "$PY" benchmarks/run_kernel_tests.py --without-install --without-pytest \
    --json "$DEST/kernel_tests_$CARD.json"
  step cuda_graph_check 120 "$PY" benchmarks/cuda_graph_check.py --cpu-dry-run --out "$DEST"
  step kernel_bench 300 "$PY" benchmarks/kernel_bench.py --smoke --sweep --simulate-graphs --out "$DEST"
  step kernel_bench_int8 120 "$PY" benchmarks/kernel_bench.py --smoke --int8 --simulate-graphs --out "$DEST"
else
  step kernel_tests 130 "$PY" benchmarks/run_kernel_tests.py --json "$DEST/kernel_tests_$CARD.json"
  step cuda_graph_check 40 "$PY" benchmarks/cuda_graph_check.py --out "$DEST"
  step kernel_bench 150 "$PY" benchmarks/kernel_bench.py --geometries llava qwen2vl --batches 1 64 256 \
    --contexts 1000 4000 --ranks 64 80 --sweep --out "$DEST"
  step kernel_bench_int8 90 "$PY" benchmarks/kernel_bench.py --int8 --geometries llava --batches 1 64 \
    --contexts 1000 4000 --ranks 64 80 --out "$DEST"
fi

if [ -f benchmarks/factorize_bench.py ]; then
  HELP=$("$PY" benchmarks/factorize_bench.py --help 2>&1 || true)
  ARGS=()
  case "$HELP" in *--out*) ARGS+=(--out "$DEST") ;; esac
  if [ "$DRY" = 1 ]; then
    case "$HELP" in
      *--smoke*) step factorize_bench 120 "$PY" benchmarks/factorize_bench.py --smoke ${ARGS[@]+"${ARGS[@]}"} ;;
      *--cpu-dry-run*) step factorize_bench 120 "$PY" benchmarks/factorize_bench.py --cpu-dry-run ${ARGS[@]+"${ARGS[@]}"} ;;
      *) echo "=== factorize_bench: no --smoke/--cpu-dry-run option; not run in the dry run" | tee -a "$LOG" ;;
    esac
  else
    step factorize_bench 60 "$PY" benchmarks/factorize_bench.py ${ARGS[@]+"${ARGS[@]}"}
  fi
else
  echo "=== factorize_bench: benchmarks/factorize_bench.py does not exist; skipped" | tee -a "$LOG"
fi

TOTAL=$(( $(date +%s) - START_ALL ))
printf '%s\n' "${STEPS[@]}" | "$PY" -c '
import json, sys
steps = []
for line in sys.stdin.read().splitlines():
    name, rc, seconds, limit, command = line.split("|", 4)
    steps.append(dict(name=name, exit=int(rc), seconds=int(seconds), limit=int(limit), timed_out=rc == "124",
                      command=command))
card, dry, total, path = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4]
json.dump(dict(card=card, dry_run=dry, total_seconds=total, ok=all(s["exit"] == 0 for s in steps), steps=steps),
          open(path, "w"), indent=1)
' "$CARD" "$DRY" "$TOTAL" "$SUMMARY"
echo "=== gpu_check done in ${TOTAL}s; results in $DEST (summary $SUMMARY, log $LOG)" | tee -a "$LOG"
FAILED=0
for s in "${STEPS[@]}"; do
  rc=$(echo "$s" | cut -d'|' -f2)
  [ "$rc" != 0 ] && FAILED=1
done
exit $FAILED
