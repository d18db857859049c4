"""Greedy chat answers of two OpenAI-compatible servers on the same prompts:
`python -m loadtest.server_agreement URL_A URL_B` (e.g. workmem and llama-server on one GGUF file).

loadtest/kv_agreement.py's twelve prompts, one at a time, temperature 0, `--max-tokens` new
tokens, each server's own chat template; prints each pair of answers, then how many are
identical and how many agree on their first `--prefix` characters. HTTP only (httpx). A
measurement, never a test: a small model's greedy answer often turns on a near-tie, which two
implementations' rounding can tip either way.
"""
from __future__ import annotations

import argparse

import httpx

from loadtest.kv_agreement import PROMPTS


def answer(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> str:
    model = client.get(f"{url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "seed": 0}
    reply = client.post(f"{url}/v1/chat/completions", json=body)
    reply.raise_for_status()
    return reply.json()["choices"][0]["message"]["content"] or ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url_a")
    parser.add_argument("url_b")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=20, help="characters compared for the looser count")
    args = parser.parse_args(argv)
    same = prefix = 0
    with httpx.Client(timeout=300) as client:
        for prompt in PROMPTS:
            a = answer(client, args.url_a.rstrip("/"), prompt, args.max_tokens)
            b = answer(client, args.url_b.rstrip("/"), prompt, args.max_tokens)
            same += a == b
            prefix += a[:args.prefix] == b[:args.prefix]
            print(f"{'=' if a == b else '~' if a[:args.prefix] == b[:args.prefix] else 'x'} {prompt!r}\n"
                  f"  A: {a!r}\n  B: {b!r}")
    print(f"identical {same} of {len(PROMPTS)}; first {args.prefix} characters {prefix} of {len(PROMPTS)}")


if __name__ == "__main__":
    main()
