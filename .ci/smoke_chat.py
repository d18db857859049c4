"""Docker smoke test (the SMOKE_CMD of .ci/docker-smoke.sh): stream one chat answer from
the server at $URL through the official `openai` SDK and require a non-empty answer.

  URL=http://127.0.0.1:8000 [WORKMEM_API_KEY=...] python .ci/smoke_chat.py ["question"]
"""
from __future__ import annotations

import os
import sys
import time

import openai

QUESTION = "What is 2+2?"
MAX_TOKENS = 48
TIMEOUT_S = 120


def main() -> int:
    url = os.environ["URL"].rstrip("/")
    question = sys.argv[1] if len(sys.argv) > 1 else QUESTION
    client = openai.OpenAI(base_url=url + "/v1", api_key=os.environ.get("WORKMEM_API_KEY") or "none",
                           max_retries=0, timeout=TIMEOUT_S)
    with client:
        model = client.models.list().data[0].id
        start = time.perf_counter()
        first = None
        parts: list[str] = []
        finish = None
        print(f"smoke chat [{model}] > {question}\n< ", end="", flush=True)
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}],
            temperature=0, max_tokens=MAX_TOKENS, stream=True,
        )
        for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            if choice.delta.content:
                first = first or time.perf_counter()
                parts.append(choice.delta.content)
                print(choice.delta.content, end="", flush=True)
            finish = choice.finish_reason or finish
        elapsed = time.perf_counter() - start
    answer = "".join(parts).strip()
    print()
    ttft = f"{first - start:.2f} s" if first else "-"
    print(f"smoke chat: {len(parts)} chunks, finish_reason={finish}, first token {ttft}, total {elapsed:.2f} s")
    if not answer:
        print("smoke chat: FAILED, empty answer", file=sys.stderr)
        return 1
    if finish not in ("stop", "length"):
        print(f"smoke chat: FAILED, finish_reason={finish!r}", file=sys.stderr)
        return 1
    print("smoke chat: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
