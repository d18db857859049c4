#!/bin/bash
# Issue 18's table in one sitting, loopback only: workmem vs llama.cpp's llama-server on the SAME GGUF files
# (the 1B-shaped random Llama in Q4_K_M, Q4_0, Q8_0 and BF16; SmolLM2-135M's Q4_1 file and its Q4_K_M
# requantization), then workmem vs vLLM's CPU backend on the BF16 1B safetensors checkpoint.
#
# Needs PEERS built by ../shared/peers/setup.sh (llama-server, llama-quantize, bench_client.py's venv, and
# vllm-venv for the vLLM row). The files are made first by ../shared/peers/make_big.sh (about 3 minutes and
# 5 GB of disk the first time; nothing is downloaded). Every row runs ../shared/peers/gguf_vs_llama.sh's
# workload: 1 stream (3 requests) and 16 streams (16 requests) of ~136-token prompts and 128 streamed new
# tokens (ignore_eos, greedy), one ~1.75k-token prompt (its TTFT is the prefill time), each server's RSS after
# the run; a 2 GiB KV budget on every side (workmem's default, llama-server -c 65536 -np 16, vLLM
# VLLM_CPU_KVCACHE_SPACE=2). workmem serves the safetensors in its default dtype (bf16 where the CPU has bf16
# arithmetic, else float32 with the bf16 weights kept bf16), vLLM in bf16. About 40-60 minutes on 2 cores (vLLM
# alone ~7 minutes to start on an AVX2-only CPU): run it on a quiet machine.
#
#   usage: loadtest/gguf_table.sh [OUT.md]      run from anywhere; prints the raw lines, then the table
#   env:   PEERS (/tmp/peers), PEER_SCRIPTS (../shared/peers, else $PEERS/scripts), PY (.venv/bin/python),
#          FILES (the GGUF rows, names under $PEERS/models/big or paths), VLLM=0 skips the vLLM row
set -u
cd "$(dirname "$0")/.."
export PEERS=${PEERS:-/tmp/peers}
OUT=${1:-/dev/stdout}
PY=${PY:-.venv/bin/python}
SCRIPTS=${PEER_SCRIPTS:-$(cd ../shared/peers 2>/dev/null && pwd || echo "$PEERS/scripts")}
BIG=$PEERS/models/big
SMOL=$($PY -c "from server.default_model import default_model_path; print(default_model_path())")
FILES=${FILES:-"llama-1b-Q4_K_M llama-1b-Q4_0 llama-1b-Q8_0 llama-1b-bf16 smol-Q4_K_M $SMOL"}
WM=18211; VL=18212
RAW=$(mktemp)

for need in "$PEERS/bin/llama-server" "$PEERS/bin/llama-quantize" "$PEERS/venv/bin/python" "$SCRIPTS/gguf_vs_llama.sh"; do
  [ -e "$need" ] || { echo "missing $need: build the peers with ../shared/peers/setup.sh first" >&2; exit 2; }
done
bash "$SCRIPTS/make_big.sh" "$SMOL" > /dev/null || { echo "make_big.sh failed" >&2; exit 1; }

wait_ok() {  # port path seconds: poll until HTTP 200
  for _ in $(seq 1 $(( $3 * 2 ))); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1$2")" = 200 ] && return 0
    sleep 0.5
  done
  return 1
}
descendants() { echo "$1"; for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do descendants "$c"; done; }  # and itself
tree_rss_mb() { local kb=0 p; for p in $(descendants "$1"); do
    kb=$(( kb + $(awk '/VmRSS/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0) )); done; echo $(( kb / 1024 )); }
stop_tree() { local pids; pids=$(descendants "$1"); kill $pids 2>/dev/null; for p in $pids; do wait "$p" 2>/dev/null; done; }
rows() {  # name port: gguf_vs_llama.sh's rows and line format, for a server that is already up
  local C="$PEERS/venv/bin/python $SCRIPTS/bench_client.py" id n
  local LONG=$PEERS/prompt-long.txt  # gguf_vs_llama.sh's: the first 1500 words of GPL-3
  [ -f "$LONG" ] || python3 -c "import sys; w=open('/usr/share/common-licenses/GPL-3').read().split();
open(sys.argv[1],'w').write(' '.join(w[:1500]))" "$LONG"
  id=$(curl -s "http://127.0.0.1:$2/v1/models" | python3 -c "import json,sys;print(json.load(sys.stdin)['data'][0]['id'])")
  $C --port "$2" --model "$id" --concurrency 2 --requests 2 --max-tokens 8 --extra '{"ignore_eos": true}' >/dev/null 2>&1
  for n in 1 16; do
    $C --port "$2" --model "$id" --concurrency $n --requests $(( n < 2 ? 3 : n )) --max-tokens 128 \
        --extra '{"ignore_eos": true}' 2>/dev/null | tail -1 | python3 -c "import json,sys;d=json.load(sys.stdin);
print('$1', 'streams=$n', 'tok/s', d['agg_tok_s'], 'ttft', d.get('ttft_s_mean'), 'decode/stream',
      d.get('per_stream_decode_tok_s_mean'), 'min', d['min_tokens_per_req'])" 2>/dev/null || echo "$1 streams=$n FAILED"
  done
  $C --port "$2" --model "$id" --concurrency 1 --requests 1 --max-tokens 16 --prompt-file "$LONG" \
      --extra '{"ignore_eos": true}' 2>/dev/null | tail -1 |
      python3 -c "import json,sys;d=json.load(sys.stdin);print('$1', 'long-prompt ttft', d.get('ttft_s_mean'))" \
      2>/dev/null || echo "$1 long-prompt FAILED"
}

{
for f in $FILES; do
  path=$f; [ -f "$path" ] || path=$BIG/$f.gguf
  [ -f "$path" ] || { echo "== file $f: missing"; continue; }
  echo "== file $(basename "$path" .gguf) $(( $(stat -c %s "$path") / 1048576 )) MB"
  bash "$SCRIPTS/gguf_vs_llama.sh" "$path" "$PY"
done
if [ "${VLLM:-1}" != 0 ] && [ -x "$PEERS/vllm-venv/bin/python" ]; then
  echo "== file llama-1b-bf16-safetensors (vLLM CPU)"
  $PY -m server serve --model "$BIG/llama-1b-random" --port $WM --no-access-log \
      --log-level warning > "$PEERS/logs/workmem-$WM.log" 2>&1 & P=$!
  if wait_ok $WM /health 300; then rows workmem $WM; echo "workmem rss_mb $(tree_rss_mb $P)"; else echo "workmem did not start"; fi
  stop_tree $P
  P=$(bash "$SCRIPTS/start_vllm_cpu.sh" "$BIG/llama-1b-random" $VL bfloat16)
  if wait_ok $VL /v1/models 600; then rows vllm $VL; echo "vllm rss_mb $(tree_rss_mb "$P")"; else echo "vllm did not start"; fi
  stop_tree "$P"
fi
} | tee "$RAW"

# The table: one row per file; the peer is llama-server, or vLLM CPU on the safetensors row.
python3 - "$RAW" > "$OUT" <<'PY'
import re, sys
rows, cur = [], None
for line in open(sys.argv[1]):
    if line.startswith("== file "):
        cur = {"file": line[8:].strip()}
        rows.append(cur)
        continue
    m = re.match(r"(workmem|llama|vllm) (streams=(\d+) (?:tok/s (\S+)|FAILED)|long-prompt (?:ttft (\S+)|FAILED)"
                 r"|rss_mb (\d+)|did not start)", line)
    if cur is None or not m:
        continue
    side = "w" if m[1] == "workmem" else "p"
    if m[3]:
        cur[f"{side}{m[3]}"] = m[4] or "FAILED"
    elif m[2].startswith("long-prompt"):
        cur[f"{side}ttft"] = m[5] or "FAILED"
    elif m[6]:
        cur[f"{side}rss"] = f"{int(m[6]) / 1024:.1f}"
    else:
        cur[f"{side}1"] = "did not start"
print("| file (peer: llama-server, or vLLM CPU) | workmem 1 stream | peer 1 stream | workmem 16 streams | peer 16 |"
      " 1.75k-token prompt TTFT s, workmem / peer | RSS GB, workmem / peer |")
print("|---|---:|---:|---:|---:|---:|---:|")
g = lambda r, k: r.get(k, "–")
for r in rows:
    print(f"| {r['file']} | {g(r, 'w1')} | {g(r, 'p1')} | {g(r, 'w16')} | {g(r, 'p16')} | "
          f"{g(r, 'wttft')} / {g(r, 'pttft')} | {g(r, 'wrss')} / {g(r, 'prss')} |")
PY
[ "$OUT" = /dev/stdout ] || cat "$OUT"
rm -f "$RAW"
