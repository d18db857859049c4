"""Multi-turn benchmark: time to first token per turn, sessions vs stateless chat.

    python -m loadtest.sessions [--turns 16] [--words-per-turn 75]

Starts two local servers on the default model (one with prefix caching, one without),
then runs the same conversation three ways and prints TTFT per turn:
  (a) a workmem session: each turn sends only its new message,
  (b) stateless /v1/chat/completions with the whole history, prefix caching on,
  (c) the same with prefix caching off (every turn re-prefills the history),
  (d) a session on a server that offloads every idle session to `--session-dir`
      (`--session-memory-fraction 0`): each turn first reads its KV back from disk.
Speaks HTTP only.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import httpx

WORDS = ("memory page block cache token turn model answer question river mountain number "
         "garden window music paper light stone cloud table letter story").split()


def user_message(rng: random.Random, words: int, turn: int) -> str:
    return f"Turn {turn}: " + " ".join(rng.choice(WORDS) for _ in range(words)) + ". Summarise briefly."


@contextmanager
def server(port: int, extra: list[str], log_path: str):
    cmd = [sys.executable, "-m", "server", "serve", "--port", str(port), "--log-level", "warning", *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited; see {log_path}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)


def stream_ttft(client: httpx.Client, path: str, body: dict) -> tuple[float, str, dict]:
    """(seconds to the first content delta, full reply, usage) of one streamed chat call."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start, ttft, text, usage = time.perf_counter(), None, "", {}
    with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text += piece
    return ttft or time.perf_counter() - start, text, usage


def run_session(url: str, turns: list[str], params: dict) -> list[tuple[float, int]]:
    with httpx.Client(base_url=url, timeout=600) as c:
        sid = c.post("/v1/sessions", json={}).json()["id"]
        out = []
        for text in turns:
            ttft, _, usage = stream_ttft(c, f"/v1/sessions/{sid}/chat/completions",
                                         {"messages": [{"role": "user", "content": text}], **params})
            out.append((ttft, usage.get("prompt_tokens", 0)))
        c.delete(f"/v1/sessions/{sid}")
        return out


def run_stateless(url: str, turns: list[str], params: dict) -> list[tuple[float, int]]:
    history: list[dict] = []
    out = []
    with httpx.Client(base_url=url, timeout=600) as c:
        for text in turns:
            history.append({"role": "user", "content": text})
            ttft, reply, usage = stream_ttft(c, "/v1/chat/completions", {"messages": history, **params})
            history.append({"role": "assistant", "content": reply})
            out.append((ttft, usage.get("prompt_tokens", 0)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.sessions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=16)
    p.add_argument("--words-per-turn", type=int, default=75, help="~100 tokens per user message")
    p.add_argument("--max-tokens", type=int, default=32, help="reply length per turn")
    p.add_argument("--port", type=int, default=8701, help="first of two ports")
    p.add_argument("--model", default=None, help="passed to both servers (default: embedded)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    turns = [user_message(rng, args.words_per_turn, i + 1) for i in range(args.turns)]
    warmup = [user_message(rng, args.words_per_turn, i + 1) for i in range(2)]

    def tagged(mode: str) -> list[str]:
        """The same conversation, opened with a per-mode tag so no run reuses another's cache."""
        return [f"[{mode}] {turns[0]}", *turns[1:]]

    params = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    extra = ["--model", args.model] if args.model else []
    logs = os.environ.get("TMPDIR", "/tmp")
    with server(args.port, extra, f"{logs}/workmem-bench-a.log") as url:
        run_stateless(url, warmup, params)
        results = {"(a) session": run_session(url, tagged("a"), params),
                   "(b) stateless, prefix cache": run_stateless(url, tagged("b"), params)}
    with server(args.port + 1, extra + ["--no-prefix-caching"], f"{logs}/workmem-bench-c.log") as url:
        run_stateless(url, warmup, params)
        results["(c) stateless, no prefix cache"] = run_stateless(url, tagged("c"), params)
    with tempfile.TemporaryDirectory() as session_dir:
        offload = ["--session-dir", session_dir, "--session-memory-fraction", "0"]
        with server(args.port + 2, extra + offload, f"{logs}/workmem-bench-d.log") as url:
            run_stateless(url, warmup, params)
            results["(d) session, offloaded to disk"] = run_session(url, tagged("d"), params)
    names = list(results)
    print("| turn | prompt tokens | " + " | ".join(f"{n} TTFT s" for n in names) + " |")
    print("|---:|---:|" + "---:|" * len(names))
    for i in range(args.turns):
        row = [f"{results[n][i][0]:.3f}" for n in names]
        print(f"| {i + 1} | {results[names[1]][i][1]} | " + " | ".join(row) + " |")
    for n in names:
        first, last = results[n][0][0], results[n][-1][0]
        print(f"{n}: turn {args.turns} / turn 1 TTFT = {last / first:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
