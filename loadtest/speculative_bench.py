"""Speculative decoding on and off: the same server, the same prompts, one sitting.

    workmem bench speculative [--model FILE] [--pairs 2] [--streams 1,16] [--workloads copy,random]

Starts two local servers on one model (default: the embedded one): a plain one, and one with
`--speculative-method ngram --num-speculative-tokens K` (plus `--spec-arg` flags). For each
pair, workload and stream count it runs the same greedy requests against both, the order
alternating from pair to pair, so a noisy minute hits both. Workloads:
  copy:   chat prompts whose answer repeats the prompt's text (repeat a passage, rewrite
          code with one change, quote a document), stopping where the model stops;
  random: the usual random-word prompts, `ignore_eos`, `--output-len` tokens each.
Greedy decoding is token-identical with and without speculation, so both servers generate
the same tokens and output tok/s compares like with like. Prints the median tok/s of each
side, their ratio, and the speculating server's acceptance counters (from /metrics) for the
run. HTTP only; nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
from dataclasses import dataclass

import httpx

from loadtest.config import BenchConfig
from loadtest.runner import run_benchmark
from loadtest.sessions import server

PLAIN, SPEC = "plain", "ngram"
SPEC_COUNTER = re.compile(r"^workmem_spec_(draft_tokens|accepted_tokens|verifies)_total (\S+)$", re.M)


@dataclass
class Cell:
    """One (workload, streams) row: output tok/s per pair for each server, and the
    speculating server's counter increments summed over the pairs."""

    tok_s: dict[str, list[float]]
    drafted: float = 0.0
    accepted: float = 0.0
    verifies: float = 0.0


def spec_counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {name: float(value) for name, value in SPEC_COUNTER.findall(text)}


def run_one(url: str, workload: str, streams: int, args: argparse.Namespace, seed: int) -> float:
    """Output tok/s of one run; raises if any request failed (a benchmark of errors is none)."""
    copy = workload == "copy"
    cfg = BenchConfig(url=url, endpoint="chat", workload=workload, concurrency=streams,
                      num_requests=args.requests_per_stream * streams, input_len=args.input_len,
                      output_len=args.copy_max_tokens if copy else args.output_len,
                      ignore_eos=not copy, warmup=0, seed=seed, progress=False)
    result = asyncio.run(run_benchmark(cfg, name=url))
    if result["failed"]:
        raise RuntimeError(f"{result['failed']} requests failed against {url}: {result['errors'][0]}")
    return result["output_throughput"]


def measure(urls: dict[str, str], args: argparse.Namespace) -> dict[tuple[str, int], Cell]:
    cells = {(w, n): Cell({PLAIN: [], SPEC: []}) for w in args.workloads for n in args.streams}
    for name, url in urls.items():  # warm both (first-request costs, kernels' first touch)
        run_one(url, "random", 1, argparse.Namespace(**{**vars(args), "requests_per_stream": 1}), seed=999)
    for pair in range(args.pairs):
        order = (PLAIN, SPEC) if pair % 2 == 0 else (SPEC, PLAIN)
        for (workload, streams), cell in cells.items():
            seed = args.seed + pair  # the same prompts for both servers within a pair
            for name in order:
                before = spec_counters(urls[SPEC]) if name == SPEC else {}
                tok_s = run_one(urls[name], workload, streams, args, seed)
                cell.tok_s[name].append(tok_s)
                if name == SPEC:
                    after = spec_counters(urls[SPEC])
                    cell.drafted += after.get("draft_tokens", 0) - before.get("draft_tokens", 0)
                    cell.accepted += after.get("accepted_tokens", 0) - before.get("accepted_tokens", 0)
                    cell.verifies += after.get("verifies", 0) - before.get("verifies", 0)
                print(f"pair {pair + 1} {workload} x{streams} {name}: {tok_s:.1f} tok/s", flush=True)
    return cells


def print_table(cells: dict[tuple[str, int], Cell], k: int) -> None:
    print(f"\n| workload | streams | plain tok/s | ngram K={k} tok/s | ratio | drafted | accepted | "
          "mean acceptance length |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (workload, streams), c in cells.items():
        plain, spec = statistics.median(c.tok_s[PLAIN]), statistics.median(c.tok_s[SPEC])
        mean_len = f"{1 + c.accepted / c.verifies:.2f}" if c.verifies else "-"
        print(f"| {workload} | {streams} | {plain:.1f} | {spec:.1f} | {spec / plain:.2f}x | "
              f"{c.drafted:.0f} | {c.accepted:.0f} | {mean_len} |")
    print("(medians over the pairs; per-pair figures above; ratio = ngram / plain)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="workmem bench speculative", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="passed to both servers (default: the embedded model)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--spec-arg", action="append", default=[],
                   help="another flag for the speculating server, e.g. --spec-arg=--speculative-max-batch=16")
    p.add_argument("--pairs", type=int, default=2, help="runs of each side per row (alternating order)")
    p.add_argument("--streams", default="1,16", help="concurrent streams per row, comma-separated")
    p.add_argument("--workloads", default="copy,random", help="comma-separated: copy, random")
    p.add_argument("--requests-per-stream", type=int, default=3)
    p.add_argument("--input-len", type=int, default=128, help="random workload: prompt words")
    p.add_argument("--output-len", type=int, default=128, help="random workload: tokens per request")
    p.add_argument("--copy-max-tokens", type=int, default=256, help="copy workload: max_tokens (stops at EOS)")
    p.add_argument("--port", type=int, default=8721, help="first of two ports")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.streams = [int(s) for s in args.streams.split(",") if s.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if bad := set(args.workloads) - {"copy", "random"}:
        p.error(f"--workloads: unknown {sorted(bad)}; copy and random are measured")
    base = ["--model", args.model] if args.model else []
    spec = ["--speculative-method", "ngram", "--num-speculative-tokens", str(args.num_speculative_tokens),
            *args.spec_arg]
    logs = os.environ.get("TMPDIR", "/tmp")
    with server(args.port, base, f"{logs}/workmem-spec-plain.log") as plain_url, \
            server(args.port + 1, base + spec, f"{logs}/workmem-spec-ngram.log") as spec_url:
        cells = measure({PLAIN: plain_url, SPEC: spec_url}, args)
    print_table(cells, args.num_speculative_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
