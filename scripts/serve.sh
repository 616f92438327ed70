#!/usr/bin/env bash
# The main job: set up .venv if needed, build the default model once, and serve it
# with AttentionPack on 127.0.0.1 through vLLM's OpenAI-compatible HTTP API.
#
#   bash scripts/serve.sh                       # SmolLM2-135M-Instruct on port 8000
#   MODEL=tiny-llava bash scripts/serve.sh      # the tiny random-weight LLaVA (images)
#   PORT=8001 bash scripts/serve.sh --additional-config '{"attentionpack": {"rank": 32}}'
#
# Extra arguments go to `vllm serve`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
PY="$ROOT/.venv/bin/python"
MODEL="${MODEL:-smollm2}"
PORT="${PORT:-8000}"
MODELS_DIR="${ATTENTIONPACK_MODELS_DIR:-$ROOT/.models}"

case "$MODEL" in
    smollm2) DIR="$MODELS_DIR/smollm2-135m-instruct" ;;
    tiny-llava) DIR="$MODELS_DIR/tiny-llava" ;;
    tiny-llama) DIR="$MODELS_DIR/tiny-llama" ;;
    *) echo "MODEL must be one of: smollm2, tiny-llava, tiny-llama (got '$MODEL')" >&2; exit 2 ;;
esac
"$PY" -m attentionpack_vllm.models "$MODEL" --out "$DIR"

NAME="$(basename "$DIR")"
cat <<MSG
[serve] starting vLLM with AttentionPack: $DIR on http://127.0.0.1:$PORT (ready in about a minute)
[serve] then, from another shell:
  curl -s http://127.0.0.1:$PORT/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$NAME", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'
  curl -s http://127.0.0.1:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$NAME", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32}'
MSG

export VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$ROOT/.venv/bin/vllm" serve "$DIR" --served-model-name "$NAME" \
    --attention-backend attentionpack --host 127.0.0.1 --port "$PORT" \
    --dtype float32 --max-model-len 4096 --max-num-seqs 16 \
    --kv-cache-memory-bytes $((1024 * 1024 * 1024)) --enforce-eager "$@"
