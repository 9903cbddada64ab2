#!/usr/bin/env bash
# Start the vLLM OpenAI-compatible server for the peer model on 127.0.0.1,
# send one /v1/completions request with a token-id prompt, print the answer,
# and stop the server.
#
# Usage: loadtests/peers/vllm/serve_smoke.sh [--dtype float32|bfloat16]
#            [--eager] [--keep] [-- EXTRA vllm serve ARGS...]
#   --eager     pass --enforce-eager (no torch.compile: ~1 min startup
#               instead of ~4, and faster on an AVX2-only 2-core box)
#   --keep      leave the server running (its PID and port are printed);
#               stop it with: kill <PID>
# Env: VLLM_PEER_VENV (default <repo>/.venv-vllm), PORT (default: a free
#      one), STARTUP_TIMEOUT seconds (default 900), VLLM_CPU_KVCACHE_SPACE
#      (default 4), VLLM_CPU_OMP_THREADS_BIND (default auto),
#      MODEL_DIR (default: written by mixtral_config.py), MODEL_JSON (dims).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
venv="${VLLM_PEER_VENV:-$repo/.venv-vllm}"
py="$venv/bin/python"
dtype=float32
keep=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dtype) dtype="$2"; shift 2 ;;
    --eager) extra+=(--enforce-eager); shift ;;
    --keep) keep=1; shift ;;
    --) shift; extra+=("$@"); break ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[ -x "$py" ] || { echo "no peer venv at $venv; run setup.sh first" >&2; exit 1; }

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-auto}"

model_dir="${MODEL_DIR:-${TMPDIR:-/tmp}/vllm-peer-serve-$dtype}"
if [ -z "${MODEL_DIR:-}" ]; then
  "$py" "$here/mixtral_config.py" "$model_dir" --dtype "$dtype" \
    ${MODEL_JSON:+--from-json "$MODEL_JSON"} --quiet
fi

port="${PORT:-$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
log="${TMPDIR:-/tmp}/vllm-peer-serve-$port.log"
echo "==> starting vllm serve on 127.0.0.1:$port (dtype $dtype, log $log)"
t0=$(date +%s)
# Not "$venv/bin/vllm": that console script fails in vllm-cpu 0.32.0 (it
# looks up the version of a distribution named "vllm"); see vllm_cli.py.
"$py" "$here/vllm_cli.py" serve "$model_dir" \
  --host 127.0.0.1 --port "$port" \
  --load-format dummy --skip-tokenizer-init \
  --dtype "$dtype" --max-model-len 2048 \
  --served-model-name peer ${extra[@]+"${extra[@]}"} >"$log" 2>&1 &
pid=$!
cleanup() {
  if [ "$keep" = 0 ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT

deadline=$(( t0 + ${STARTUP_TIMEOUT:-900} ))
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "==> server exited during startup; last log lines:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "==> server not healthy after ${STARTUP_TIMEOUT:-900}s" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
  sleep 2
done
echo "==> healthy after $(( $(date +%s) - t0 )) s"

body='{"model": "peer", "prompt": [1, 100, 200, 300, 400, 500, 600, 700],
       "max_tokens": 16, "temperature": 0, "ignore_eos": true,
       "return_token_ids": true}'
echo "==> POST /v1/completions"
curl -sS --max-time 300 -H 'Content-Type: application/json' \
  -w '\n==> HTTP %{http_code}, request took %{time_total} s\n' \
  -d "$body" "http://127.0.0.1:$port/v1/completions"
if [ "$keep" = 1 ]; then
  echo "==> server left running: PID $pid port $port"
fi
