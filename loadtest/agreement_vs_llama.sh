#!/bin/bash
# Greedy chat answers, workmem vs llama.cpp's llama-server on the SAME GGUF file(s), loopback only:
# loadtest/server_agreement.py's prompts (12, temperature 0, 32 new tokens), each server with the file's
# own chat template (llama-server --jinja). One line of counts per file, after each pair of answers.
#   usage: loadtest/agreement_vs_llama.sh FILE.gguf [FILE.gguf ...]
#   env:   PEERS (/tmp/peers, built by ../shared/peers/setup.sh), PY (.venv/bin/python)
set -u
cd "$(dirname "$0")/.."
PEERS=${PEERS:-/tmp/peers}; PY=${PY:-.venv/bin/python}
WM=18221; LL=18222
mkdir -p "$PEERS/logs"
wait_ok() { for _ in $(seq 1 600); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/health")" = 200 ] && return 0; sleep 0.5; done
  return 1; }
for f in "$@"; do
  echo "== $(basename "$f")"
  $PY -m server serve --model "$f" --port $WM --no-access-log --log-level warning > "$PEERS/logs/agree-wm.log" 2>&1 &
  W=$!
  "$PEERS/bin/llama-server" -m "$f" --host 127.0.0.1 --port $LL -t 2 --jinja --no-webui > "$PEERS/logs/agree-ll.log" 2>&1 &
  L=$!
  if wait_ok $WM && wait_ok $LL; then
    $PY -m loadtest.server_agreement "http://127.0.0.1:$WM" "http://127.0.0.1:$LL"
  else
    echo "a server did not start: $PEERS/logs/agree-wm.log, $PEERS/logs/agree-ll.log"
  fi
  kill $W $L; wait $W $L 2>/dev/null
done
