"""`python -m loadtest` = `workmem bench serve`: load-test any OpenAI-compatible server
(workmem, vLLM, llama.cpp's llama-server) over streaming HTTP.

    python -m loadtest --url http://127.0.0.1:8000 --concurrency 8 --num-requests 64
    python -m loadtest --request-rate 4 --duration 60 --slo ttft_ms=500,tpot_ms=50
    python -m loadtest --workload sessions --num-sessions 8 --turns 6
    python -m loadtest --sweep-rate 1,2,4,8 --num-requests 32 --plot sweep.png
    python -m loadtest --url http://127.0.0.1:8000 --compare http://127.0.0.1:8080=llama.cpp

Prints a summary table (ratios against the first server with --compare); --out writes
the result JSON, --plot a figure (needs `pip install 'workmem[bench]'`). Exit status 0
when every run completed at least one request, 1 otherwise, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from dataclasses import replace

from loadtest import config as c
from loadtest.config import BenchConfig, Target, parse_rates, parse_slo, parse_target
from loadtest.plot import MissingExtra, plot_runs, require_matplotlib
from loadtest.runner import run_benchmark
from loadtest.table import print_table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=c.DEFAULT_URL, help=f"server base URL (default {c.DEFAULT_URL})")
    p.add_argument("--name", default=None, help="label of --url in tables (default: its host:port)")
    p.add_argument("--model", default=None, help="model id (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="/v1/completions or /v1/chat/completions (sessions and copy always chat)")
    p.add_argument("--workload", choices=c.WORKLOADS, default="random",
                   help="copy: instructions whose answer repeats the prompt's text (for speculative decoding)")
    add_load_args(p.add_argument_group("load shape"))
    add_request_args(p.add_argument_group("requests"))
    add_output_args(p.add_argument_group("output"))
    return p


def add_load_args(load: argparse._ArgumentGroup) -> None:
    load.add_argument("--concurrency", type=int, default=None, help="max requests in flight (default: no cap)")
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="arrivals per second, Poisson (default inf: all at once, capped by --concurrency)")
    load.add_argument("--burstiness", type=float, default=c.DEFAULT_BURSTINESS,
                      help="gamma shape of inter-arrival times: 1 Poisson, <1 burstier (default 1)")
    load.add_argument("--num-requests", type=int, default=None,
                      help=f"requests to measure (default {c.DEFAULT_NUM_REQUESTS}; unbounded with --duration)")
    load.add_argument("--duration", type=float, default=None, help="stop issuing requests after this many seconds")
    load.add_argument("--warmup", type=int, default=c.DEFAULT_WARMUP, help=f"unmeasured requests first (default {c.DEFAULT_WARMUP})")
    load.add_argument("--seed", type=int, default=c.DEFAULT_SEED, help="prompts and arrivals (default 0)")
    load.add_argument("--timeout", type=float, default=c.DEFAULT_TIMEOUT_S, help=f"per request, seconds (default {c.DEFAULT_TIMEOUT_S:.0f})")


def add_request_args(shape: argparse._ArgumentGroup) -> None:
    shape.add_argument("--input-len", type=int, default=c.DEFAULT_INPUT_LEN, help=f"prompt words, ~1 token each (default {c.DEFAULT_INPUT_LEN})")
    shape.add_argument("--output-len", type=int, default=c.DEFAULT_OUTPUT_LEN, help=f"max_tokens per request (default {c.DEFAULT_OUTPUT_LEN})")
    shape.add_argument("--range-ratio", type=float, default=c.DEFAULT_RANGE_RATIO,
                       help="lengths uniform in [len*(1-r), len*(1+r)] (default 0: fixed)")
    shape.add_argument("--shared-prefix-len", type=int, default=c.DEFAULT_SHARED_PREFIX_LEN,
                       help=f"shared-prefix: words every prompt starts with (default {c.DEFAULT_SHARED_PREFIX_LEN})")
    shape.add_argument("--num-sessions", type=int, default=c.DEFAULT_NUM_SESSIONS, help=f"sessions: conversations (default {c.DEFAULT_NUM_SESSIONS})")
    shape.add_argument("--turns", type=int, default=c.DEFAULT_TURNS, help=f"sessions: turns per conversation (default {c.DEFAULT_TURNS})")
    shape.add_argument("--keep-sessions", action="store_true", help="sessions: do not delete them afterwards")
    shape.add_argument("--no-session-api", action="store_true",
                       help="sessions: resend the whole history on /v1/chat/completions even where the "
                            "server has /v1/sessions (default: use it when the probe finds it)")
    shape.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                       help="generate exactly --output-len tokens (default on)")


def add_output_args(out: argparse._ArgumentGroup) -> None:
    out.add_argument("--slo", default=None, help="e.g. ttft_ms=500,tpot_ms=50,e2e_ms=10000 (goodput)")
    out.add_argument("--out", default=None, help="write the result JSON here")
    out.add_argument("--plot", default=None, help="write a PNG of latencies, throughput, KV usage")
    out.add_argument("--sweep-rate", default=None, help="one run per request rate, e.g. 1,2,4,8")
    out.add_argument("--compare", nargs="+", default=None, metavar="URL[=NAME]",
                     help="also run the same workload against these servers, one after another")
    out.add_argument("--scrape-interval", type=float, default=c.DEFAULT_SCRAPE_INTERVAL_S,
                     help=f"seconds between /metrics scrapes (default {c.DEFAULT_SCRAPE_INTERVAL_S})")
    out.add_argument("--no-progress", action="store_true", help="no live progress display")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    num = args.num_requests if args.num_requests is not None else (None if args.duration else c.DEFAULT_NUM_REQUESTS)
    cfg = BenchConfig(
        url=args.url.rstrip("/"), model=args.model, api_key=args.api_key,
        endpoint="chat" if args.workload in ("sessions", "copy") else args.endpoint, workload=args.workload,
        concurrency=args.concurrency, request_rate=args.request_rate, burstiness=args.burstiness,
        num_requests=num, duration_s=args.duration, input_len=args.input_len, output_len=args.output_len,
        range_ratio=args.range_ratio, shared_prefix_len=args.shared_prefix_len,
        num_sessions=args.num_sessions, turns=args.turns, keep_sessions=args.keep_sessions,
        use_session_api=not args.no_session_api,
        ignore_eos=args.ignore_eos, warmup=args.warmup, slo=parse_slo(args.slo), seed=args.seed,
        timeout_s=args.timeout, scrape_interval_s=args.scrape_interval, progress=not args.no_progress,
    )
    validate(cfg)
    return cfg


def validate(cfg: BenchConfig) -> None:
    """ValueError naming the flag for settings that cannot run."""
    if cfg.concurrency is not None and cfg.concurrency < 1:
        raise ValueError("--concurrency must be >= 1")
    if cfg.request_rate <= 0 or cfg.burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be > 0")
    if min(cfg.input_len, cfg.output_len, cfg.turns, cfg.num_sessions) < 1 or cfg.warmup < 0:
        raise ValueError("--input-len, --output-len, --turns, --num-sessions must be >= 1, --warmup >= 0")
    if not 0 <= cfg.range_ratio < 1:
        raise ValueError("--range-ratio must be in [0, 1)")
    if cfg.num_requests is None and cfg.workload != "sessions" and math.isinf(cfg.request_rate) and not cfg.concurrency:
        raise ValueError("a run bounded by --duration only needs --concurrency or --request-rate")


async def run_all(cfg: BenchConfig, targets: list[Target], rates: list[float] | None) -> list[dict]:
    """The runs one after another: each target, or each rate of a sweep (prompts seeded
    `seed + i` there, so no point reuses another's prefix cache)."""
    if rates:
        return [await run_benchmark(replace(cfg, request_rate=r, seed=cfg.seed + i), name=f"{r:g} req/s")
                for i, r in enumerate(rates)]
    return [await run_benchmark(replace(cfg, url=t.url), name=t.name) for t in targets]


def write_json(path: str, runs: list[dict], compare: bool, rates: list[float] | None) -> None:
    doc = {"sweep": runs, "rates": rates} if rates else {"compare": runs} if compare else runs[0]
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, default=str)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        rates = parse_rates(args.sweep_rate) if args.sweep_rate else None
        if rates and args.compare:
            raise ValueError("--sweep-rate and --compare cannot be combined")
        targets = [Target(cfg.url, args.name or parse_target(cfg.url, 0).name),
                   *(parse_target(t, i + 1) for i, t in enumerate(args.compare or []))]
        if args.plot:
            require_matplotlib()
    except (ValueError, MissingExtra) as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2
    runs = asyncio.run(run_all(cfg, targets, rates))
    title = f"{cfg.workload} workload, {cfg.endpoint}" + (", sweep" if rates else "")
    print_table(runs, title, ratios=bool(args.compare))
    if args.out:
        write_json(args.out, runs, bool(args.compare), rates)
    if args.plot:
        plot_runs(runs, args.plot, rates)
    return 0 if all(r["completed"] for r in runs) else 1
