"""HTTP load test: concurrent streaming completions against a running server.

    python -m loadtest.http --url http://127.0.0.1:8000 --concurrency 16 --requests 32

Each request streams `/v1/completions` (greedy, `ignore_eos`, a unique nonce first so
the prefix cache gives no free hits) and records time to first token, decode rate and
completion tokens (from the usage chunk). Prints a summary table; `--json` saves it.
Speaks HTTP only (httpx); no engine imports.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass

import httpx

FILLER = ("Working memory holds the conversation while the model thinks about the next word. ")


@dataclass
class Result:
    ttft: float
    seconds: float
    tokens: int
    decode_tok_s: float | None


async def one(client: httpx.AsyncClient, args, index: int, nonce: int) -> Result:
    prompt = f"#{nonce}-{index}\n" + FILLER * args.prompt_repeats
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = last = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                last = time.perf_counter()
                ttft = ttft if ttft is not None else last - start
    seconds = time.perf_counter() - start
    decode = (tokens - 1) / (last - start - ttft) if ttft is not None and tokens > 1 and last > start + ttft else None
    return Result(ttft or seconds, seconds, tokens, decode)


async def run(args) -> dict:
    nonce = random.randrange(10**9)
    queue = list(range(args.requests))
    results: list[Result] = []
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout, headers=headers,
                                 limits=httpx.Limits(max_connections=args.concurrency + 4)) as client:
        async def worker() -> None:
            while queue:
                results.append(await one(client, args, queue.pop(), nonce))

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(args.concurrency)])
        wall = time.perf_counter() - start
    ttfts = sorted(r.ttft for r in results)
    decodes = [r.decode_tok_s for r in results if r.decode_tok_s]
    return {
        "concurrency": args.concurrency, "requests": len(results), "wall_s": wall,
        "output_tokens": sum(r.tokens for r in results),
        "output_tok_s": sum(r.tokens for r in results) / wall,
        "ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))],
        "per_stream_decode_tok_s": statistics.median(decodes) if decodes else None,
        "results": [asdict(r) for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.http", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--concurrency", type=int, default=1, help="parallel streams (default 1)")
    p.add_argument("--requests", type=int, default=None, help="total requests (default: = concurrency)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default 128)")
    p.add_argument("--prompt-repeats", type=int, default=9, help="filler sentences in the prompt (9 ~ 136 tokens)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", default=None, help="write the summary here")
    args = p.parse_args(argv)
    args.requests = args.requests or args.concurrency
    summary = asyncio.run(run(args))
    print("| concurrency | requests | output tok/s | TTFT p50 (s) | TTFT p90 (s) | per-stream decode tok/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    dec = summary["per_stream_decode_tok_s"]
    print(f"| {summary['concurrency']} | {summary['requests']} | {summary['output_tok_s']:.1f} | "
          f"{summary['ttft_p50_s']:.3f} | {summary['ttft_p90_s']:.3f} | {dec:.1f} |" if dec else "")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
