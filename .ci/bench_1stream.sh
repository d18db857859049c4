#!/usr/bin/env bash
# A short 1-stream run against the server at $URL (BENCHMARKS.md's workload: ~136-token
# prompts, 128 new tokens, ignore_eos; BENCH_REQUESTS of them after one warm-up). Prints
# "bench 1 stream [LABEL]: X tok/s" and appends "LABEL X" to $BENCH_OUT when set. Reported,
# never asserted: the CPU is shared.
#   URL=http://127.0.0.1:8000 bash .ci/bench_1stream.sh LABEL
set -euo pipefail
cd "$(dirname "$0")/.."
LABEL=${1:?usage: bench_1stream.sh LABEL}
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
.venv/bin/python -m loadtest --url "$URL" --concurrency 1 --num-requests "${BENCH_REQUESTS:-4}" --warmup 1 \
  --input-len 136 --output-len 128 --ignore-eos --no-progress --out "$OUT" >/dev/null
TOK=$(.venv/bin/python -c "
import json, sys
doc = json.load(open(sys.argv[1]))
print(f'{doc.get(\"summary\", doc)[\"output_throughput\"]:.1f}')" "$OUT")
echo "bench 1 stream [$LABEL]: $TOK tok/s"
if [ -n "${BENCH_OUT:-}" ]; then echo "$LABEL $TOK" >>"$BENCH_OUT"; fi
