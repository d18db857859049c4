"""A conversation chained by `previous_response_id` vs the same one resent whole to chat.

    python -m loadtest.responses_turns [--turns 5] [--words-per-turn 75] [--max-tokens 32]

Starts local servers on the default model (`--model` for another) and runs one greedy
conversation three ways, each with its own words (no way reuses another's prefix cache):
  (a) /v1/responses, each turn sending only its new message with previous_response_id
      (the previous response's session: its KV resident),
  (b) /v1/chat/completions with the whole history every turn, prefix caching on,
  (c) the same on a server with --no-prefix-caching (every turn re-prefills the history).
Prints per turn: prompt tokens, cached tokens and the median (over --repeats conversations)
time to the first streamed text. HTTP only.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import httpx

from loadtest.sessions import server

WORDS = ("memory page block cache river stone light paper window garden number signal market "
         "letter engine table winter forest bridge music story planet ocean city mountain").split()
TIMEOUT_S = 600


def message(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + ". Summarize that."


def _stream(client: httpx.Client, path: str, body: dict) -> tuple[float | None, dict, str, str | None]:
    """(seconds to the first text, usage, text, response id) of one streamed request."""
    start, first, usage, text, rid = time.perf_counter(), None, {}, "", None
    with client.stream("POST", path, json=body, timeout=TIMEOUT_S) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            delta = ev.get("delta") if ev.get("type") == "response.output_text.delta" else None
            if ev.get("choices"):
                delta = ev["choices"][0]["delta"].get("content")
            if delta:
                first = first or time.perf_counter() - start
                text += delta
            if ev.get("type") in ("response.completed", "response.incomplete"):
                usage, rid = ev["response"]["usage"], ev["response"]["id"]
            elif ev.get("usage"):
                usage = ev["usage"]
    return first, usage, text, rid


def responses_chain(url: str, args: argparse.Namespace, seed: int) -> list[dict]:
    rng, previous, rows = random.Random(seed), None, []
    with httpx.Client(base_url=url) as client:
        for _ in range(args.turns):
            body = {"input": message(rng, args.words_per_turn), "max_output_tokens": args.max_tokens,
                    "temperature": 0, "stream": True, "instructions": "You are brief."}
            if previous:
                body["previous_response_id"] = previous
            ttft, usage, _, previous = _stream(client, "/v1/responses", body)
            rows.append({"ttft_s": ttft, "prompt_tokens": usage["input_tokens"],
                         "cached_tokens": usage["input_tokens_details"]["cached_tokens"]})
    return rows


def chat_resent(url: str, args: argparse.Namespace, seed: int) -> list[dict]:
    rng, history, rows = random.Random(seed), [{"role": "system", "content": "You are brief."}], []
    with httpx.Client(base_url=url) as client:
        for _ in range(args.turns):
            history.append({"role": "user", "content": message(rng, args.words_per_turn)})
            body = {"messages": history, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            ttft, usage, text, _ = _stream(client, "/v1/chat/completions", body)
            history.append({"role": "assistant", "content": text})
            rows.append({"ttft_s": ttft, "prompt_tokens": usage["prompt_tokens"],
                         "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]})
    return rows


A, B, C = "(a) responses chain", "(b) chat resent, prefix cache", "(c) chat resent, no prefix cache"


def _median_rows(tries: list[list[dict]]) -> list[dict]:
    """Per turn: the median TTFT over the tries, the first try's token counts."""
    return [{**turns[0], "ttft_s": statistics.median(t["ttft_s"] for t in turns)} for turns in zip(*tries)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.responses_turns", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--words-per-turn", type=int, default=75)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--port", type=int, default=8711, help="first of two ports")
    p.add_argument("--model", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="conversations per way (other words each); the "
                                                            "median TTFT per turn is reported")
    args = p.parse_args(argv)
    extra = ["--model", args.model] if args.model else []
    logs = os.environ.get("TMPDIR", "/tmp")
    tries: dict[str, list[list[dict]]] = {A: [], B: [], C: []}
    with server(args.port, extra, f"{logs}/workmem-responses-a.log") as url:
        for r in range(args.repeats):  # alternating, so a noisy minute hits both ways
            tries[A].append(responses_chain(url, args, args.seed + 3 * r))
            tries[B].append(chat_resent(url, args, args.seed + 3 * r + 1))
    with server(args.port + 1, extra + ["--no-prefix-caching"], f"{logs}/workmem-responses-c.log") as url:
        for r in range(args.repeats):
            tries[C].append(chat_resent(url, args, args.seed + 3 * r + 2))
    runs = {name: _median_rows(rows) for name, rows in tries.items()}
    print("| turn | " + " | ".join(f"{n}: prompt / cached / TTFT s" for n in runs) + " |")
    print("|---:|" + "---|" * len(runs))
    for i in range(args.turns):
        cells = [f"{r[i]['prompt_tokens']} / {r[i]['cached_tokens']} / {r[i]['ttft_s']:.3f}" for r in runs.values()]
        print(f"| {i + 1} | " + " | ".join(cells) + " |")
    for name, rows in runs.items():
        print(f"{name}: turn {args.turns} / turn 1 TTFT = {rows[-1]['ttft_s'] / rows[0]['ttft_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
