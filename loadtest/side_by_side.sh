#!/bin/bash
# Side-by-side serving benchmark, all in one sitting, on loopback (see BENCHMARKS.md):
#   workmem vs llama.cpp's llama-server on the SAME GGUF file (the default model, Q4_1),
#   vs the naive transformers server (loadtest/baselines/naive_hf.py, same file, bf16),
#   and workmem vs vLLM's CPU backend on a bf16 135M Llama (no quantization).
# Workload: ~136-token prompts, 128 streamed new tokens, ignore_eos, greedy, the streaming
# client of ../shared/peers (bench_client.py). Needs the peers built by ../shared/peers/setup.sh.
#   usage: loadtest/side_by_side.sh [OUT.md]       (PEERS=/tmp/peers by default)
set -u
cd "$(dirname "$0")/.."
export PEERS=${PEERS:-/tmp/peers}
OUT=${1:-/dev/stdout}
PY=.venv/bin/python
SCRIPTS=${PEER_SCRIPTS:-$(cd ../shared/peers 2>/dev/null && pwd || echo "$PEERS/scripts")}
GGUF=$($PY -c "from server.default_model import default_model_path; print(default_model_path())")
RANDOM135=$PEERS/models/llama-135m-random
WM=18101; LC=18102; HF=18103; VL=18104

wait_ready() {  # port [path] [seconds]: poll until HTTP 200 (vLLM CPU needs ~100 s to start)
  for _ in $(seq 1 $(( ${3:-120} * 2 ))); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1${2:-/v1/models}")" = 200 ] && return 0
    sleep 0.5
  done
  echo "server on port $1 not ready" >&2; return 1
}
bench() {  # system model port streams requests -> one table row
  local sys=$1 model=$2 port=$3 n=$4 reqs=$5 id
  id=$(curl -s "http://127.0.0.1:$port/v1/models" | python3 -c "import json,sys;print(json.load(sys.stdin)['data'][0]['id'])")
  "$PEERS/venv/bin/python" "$SCRIPTS/bench_client.py" --port "$port" --model "$id" --concurrency 2 --requests 2 \
      --max-tokens 8 --extra '{"ignore_eos": true}' >/dev/null
  "$PEERS/venv/bin/python" "$SCRIPTS/bench_client.py" --port "$port" --model "$id" --concurrency "$n" --requests "$reqs" \
      --max-tokens 128 --extra '{"ignore_eos": true}' | tail -1 | python3 -c "
import json, sys; d = json.load(sys.stdin)
print(f\"| $sys | $model | $n | $reqs | {d['agg_tok_s']} | {d.get('ttft_s_mean')} | {d.get('per_stream_decode_tok_s_mean')} | {d['min_tokens_per_req']} |\")"
}
stop() { kill "$1" 2>/dev/null; wait "$1" 2>/dev/null; }

{
echo "| system | model | streams | requests | output tok/s | TTFT mean (s) | per-stream decode tok/s | min tokens/request |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"
$PY -m server serve --model "$GGUF" --port $WM --no-access-log --log-level warning & P=$!
wait_ready $WM /health
for n in 1 16 32; do bench workmem "SmolLM2 Q4_1 GGUF" $WM $n $(( n < 2 ? 3 : n )); done
stop $P
P=$(bash "$SCRIPTS/start_llama_server.sh" "$GGUF" $LC 32); wait_ready $LC /health
for n in 1 16 32; do bench llama-server "SmolLM2 Q4_1 GGUF" $LC $n $(( n < 2 ? 3 : n )); done
stop $P
$PY -m loadtest.baselines.naive_hf --model "$GGUF" --dtype bfloat16 --port $HF & P=$!
wait_ready $HF
bench "naive transformers" "SmolLM2 GGUF (bf16)" $HF 1 2
bench "naive transformers" "SmolLM2 GGUF (bf16)" $HF 32 4
stop $P
if [ -d "$RANDOM135" ]; then
  $PY -m server serve --model "$RANDOM135" --dtype bfloat16 --port $WM --no-access-log --log-level warning & P=$!
  wait_ready $WM /health
  for n in 1 16; do bench workmem "135M random bf16" $WM $n $(( n < 2 ? 3 : n )); done
  stop $P
  if [ -x "$PEERS/vllm-venv/bin/python" ]; then
    P=$(bash "$SCRIPTS/start_vllm_cpu.sh" "$RANDOM135" $VL bfloat16); wait_ready $VL /v1/models 300
    for n in 1 16; do bench "vLLM CPU" "135M random bf16" $VL $n $(( n < 2 ? 3 : n )); done
    stop $P; pkill -f "vllm.entrypoints.openai.api_server.*--port $VL" 2>/dev/null
  fi
fi
} | tee "$OUT"
