"""Multi-turn benchmark: time to first token per turn, sessions vs stateless chat.

    python -m loadtest.sessions [--turns 16] [--words-per-turn 75]

A thin script on top of `python -m loadtest --workload sessions`: it starts local servers
on the default model and runs one conversation (`--turns` user messages of
`--words-per-turn` words, `--max-tokens` greedy tokens per reply) four ways:
  (a) a workmem session: each turn sends only its new message (/v1/sessions),
  (b) stateless /v1/chat/completions with the whole history, prefix caching on,
  (c) the same with prefix caching off (every turn re-prefills the history),
  (d) a session on a server that offloads every idle session to `--session-dir`
      (`--session-memory-fraction 0`): each turn first reads its KV back from disk.
Each way gets its own seed (same lengths, other words), so no run reuses another's
prefix cache. Prints TTFT per turn; `--json` saves the four results. HTTP only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from loadtest.config import BenchConfig
from loadtest.runner import run_benchmark

STARTUP_TIMEOUT_S = 300
STOP_TIMEOUT_S = 30
POLL_S = 0.5
MODE_A, MODE_B, MODE_C, MODE_D = ("(a) session", "(b) stateless, prefix cache",
                                  "(c) stateless, no prefix cache", "(d) session, offloaded to disk")


@contextmanager
def server(port: int, extra: list[str], log_path: str) -> Iterator[str]:
    """A `python -m server serve` on loopback for the block; yields its URL."""
    cmd = [sys.executable, "-m", "server", "serve", "--port", str(port), "--log-level", "warning", *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited; see {log_path}")
                time.sleep(POLL_S)
            yield url
        finally:
            proc.terminate()
            proc.wait(STOP_TIMEOUT_S)


def run_mode(url: str, name: str, args: argparse.Namespace, use_session_api: bool, seed: int) -> dict:
    cfg = BenchConfig(url=url, workload="sessions", endpoint="chat", num_sessions=1, turns=args.turns,
                      input_len=args.words_per_turn, output_len=args.max_tokens, concurrency=1,
                      use_session_api=use_session_api, seed=seed, progress=False)
    return asyncio.run(run_benchmark(cfg, name=name))


def ttft_s(run: dict, turn: int) -> float | None:
    by_turn = run.get("ttft_ms_by_turn") or []
    p50 = by_turn[turn]["ttft_ms"]["p50"] if turn < len(by_turn) else None
    return None if p50 is None else p50 / 1000


def print_turns(results: dict[str, dict], turns: int) -> None:
    names = list(results)
    print("| turn | prompt tokens | " + " | ".join(f"{n} TTFT s" for n in names) + " |")
    print("|---:|---:|" + "---:|" * len(names))
    history = results[MODE_B].get("ttft_ms_by_turn") or []
    for i in range(turns):
        tokens = round(history[i]["prompt_tokens_mean"]) if i < len(history) else "-"
        cells = [f"{t:.3f}" if (t := ttft_s(results[n], i)) is not None else "-" for n in names]
        print(f"| {i + 1} | {tokens} | " + " | ".join(cells) + " |")
    for n in names:
        first, last = ttft_s(results[n], 0), ttft_s(results[n], turns - 1)
        if first and last is not None:
            print(f"{n}: turn {turns} / turn 1 TTFT = {last / first:.2f}x")
        if results[n]["failed"]:
            print(f"{n}: {results[n]['failed']} failed; first error: {results[n]['errors'][0]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.sessions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=16)
    p.add_argument("--words-per-turn", type=int, default=75, help="~75-100 tokens per user message")
    p.add_argument("--max-tokens", type=int, default=32, help="reply length per turn")
    p.add_argument("--port", type=int, default=8701, help="first of three ports")
    p.add_argument("--model", default=None, help="passed to the servers (default: embedded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the four results here")
    args = p.parse_args(argv)
    extra = ["--model", args.model] if args.model else []
    logs = os.environ.get("TMPDIR", "/tmp")
    results = {}
    with server(args.port, extra, f"{logs}/workmem-bench-a.log") as url:
        results[MODE_A] = run_mode(url, MODE_A, args, True, args.seed)
        results[MODE_B] = run_mode(url, MODE_B, args, False, args.seed + 1)
    with server(args.port + 1, extra + ["--no-prefix-caching"], f"{logs}/workmem-bench-c.log") as url:
        results[MODE_C] = run_mode(url, MODE_C, args, False, args.seed + 2)
    with tempfile.TemporaryDirectory() as session_dir:
        offload = ["--session-dir", session_dir, "--session-memory-fraction", "0"]
        with server(args.port + 2, extra + offload, f"{logs}/workmem-bench-d.log") as url:
            results[MODE_D] = run_mode(url, MODE_D, args, True, args.seed + 3)
    print_turns(results, args.turns)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
