"""Request results -> the result JSON: latency percentiles (ms), throughputs, goodput,
per-turn TTFT, throughput over time. Pure functions of the measured numbers."""
from __future__ import annotations

import math
from collections import defaultdict

from loadtest.client import RequestResult

PERCENTILES = (50, 90, 99)
MAX_ERRORS = 10  # error messages kept in the result
THROUGHPUT_BUCKET_S = 1.0  # width of a throughput-over-time bucket
MS = 1000.0


def percentile(sorted_values: list[float], q: float) -> float:
    """q-th percentile (0..100) of ascending values, linearly interpolated (numpy's default)."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def stats_ms(values_s: list[float]) -> dict[str, float | None]:
    """Seconds -> {mean, p50, p90, p99, max} in milliseconds (all None when empty)."""
    keys = ["mean", *(f"p{q}" for q in PERCENTILES), "max"]
    if not values_s:
        return dict.fromkeys(keys)
    v = sorted(x * MS for x in values_s)
    return {"mean": sum(v) / len(v), **{f"p{q}": percentile(v, q) for q in PERCENTILES}, "max": v[-1]}


def itls(r: RequestResult) -> list[float]:
    """Gaps between successive content chunks of one request (seconds)."""
    return [b - a for a, b in zip(r.chunk_times, r.chunk_times[1:])]


def meets_slo(r: RequestResult, slo: dict[str, float]) -> bool:
    """All SLOs met; a request with one output token has no TPOT and meets a TPOT SLO."""
    measured = {"ttft_ms": r.ttft_s, "tpot_ms": r.tpot_s, "e2e_ms": r.e2e_s}
    for key, limit in slo.items():
        value = measured[key]
        if value is None and key == "tpot_ms":
            continue
        if value is None or value * MS > limit:
            return False
    return True


def counts_source(ok: list[RequestResult]) -> str | None:
    """"usage" when every count came from the server's usage, "chunks" when none did."""
    sources = {r.counts_from for r in ok}
    return None if not sources else sources.pop() if len(sources) == 1 else "mixed"


def per_turn(ok: list[RequestResult]) -> list[dict]:
    """Conversations: TTFT stats, mean prompt and cached tokens of each turn."""
    by_turn: dict[int, list[RequestResult]] = defaultdict(list)
    for r in ok:
        if r.turn is not None:
            by_turn[r.turn].append(r)
    return [{"turn": t, "requests": len(rs), "ttft_ms": stats_ms([r.ttft_s for r in rs if r.ttft_s is not None]),
             "prompt_tokens_mean": sum(r.prompt_tokens for r in rs) / len(rs),
             "cached_tokens_mean": sum(r.cached_tokens for r in rs) / len(rs)}
            for t, rs in sorted(by_turn.items())]


def throughput_over_time(ok: list[RequestResult], run_start: float) -> dict[str, list[float]]:
    """Output tokens/s in buckets of THROUGHPUT_BUCKET_S since the run's start: each
    request's measured output tokens spread evenly over its content chunks."""
    buckets: dict[int, float] = defaultdict(float)
    for r in ok:
        if r.chunk_times:
            weight = r.output_tokens / len(r.chunk_times)
            for t in r.chunk_times:
                buckets[int((r.start - run_start + t) / THROUGHPUT_BUCKET_S)] += weight
    n = max(buckets) + 1 if buckets else 0
    return {"t_s": [i * THROUGHPUT_BUCKET_S for i in range(n)],
            "output_tok_s": [buckets.get(i, 0.0) / THROUGHPUT_BUCKET_S for i in range(n)]}


def request_records(results: list[RequestResult], run_start: float) -> list[dict]:
    """One compact record per request (times in ms; `start_s` since the run's start)."""
    def ms(x: float | None) -> float | None:
        return None if x is None else x * MS

    return [{"ok": r.ok, "start_s": r.start - run_start, "ttft_ms": ms(r.ttft_s), "tpot_ms": ms(r.tpot_s),
             "e2e_ms": ms(r.e2e_s), "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
             "cached_tokens": r.cached_tokens, "turn": r.turn, "error": r.error} for r in results]


def summarize(results: list[RequestResult], duration_s: float, run_start: float, slo: dict[str, float]) -> dict:
    """The measured part of the result JSON (see README "Benchmarking" for the fields)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    result = {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": [r.error for r in results if not r.ok][:MAX_ERRORS],
        "duration_s": duration_s,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "total_cached_tokens": sum(r.cached_tokens for r in ok),
        "token_counts_from": counts_source(ok),
        "request_throughput": len(ok) * per_s, "output_throughput": out_tokens * per_s,
        "total_token_throughput": (in_tokens + out_tokens) * per_s,
        "ttft_ms": stats_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": stats_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": stats_ms([g for r in ok for g in itls(r)]),
        "e2e_ms": stats_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
        "goodput": sum(meets_slo(r, slo) for r in ok) * per_s if slo else None,
        "throughput_over_time": throughput_over_time(ok, run_start),
        "requests": request_records(results, run_start),
    }
    if any(r.turn is not None for r in results):
        result["ttft_ms_by_turn"] = per_turn(ok)
    return result
