"""`workmem bench perplexity` (= `python -m loadtest.perplexity`): the perplexity of a text
file through any OpenAI-compatible server whose `/v1/completions` takes `echo` with
`logprobs` and `max_tokens: 0` (workmem, vLLM), in windows of a stated context length.

    python -m loadtest.perplexity /usr/share/common-licenses/GPL-3 --url http://127.0.0.1:8000 \\
        --context 512 --second-half

The text is tokenized once by the server (`POST /tokenize`, no special tokens) and cut
into consecutive, non-overlapping windows of `--context` tokens (a tail shorter than a
window is dropped). Each window goes as token ids with `echo`, `logprobs: 0`,
`max_tokens: 0`; its tokens' logprobs come back (the first null). Perplexity is
exp(mean negative log-likelihood) over the scored tokens: every token but each window's
first, or with `--second-half` only tokens `context/2 + 1 .. context - 1` of each window,
which is what llama.cpp's `llama-perplexity` scores (each scored token then has at least
half a window of context), so the two numbers compare on the same file and `-c`.
`--bos-id` replaces each window's first token, as llama-perplexity does for models whose
vocabulary adds a BOS token. The ± is llama-perplexity's: perplexity x the standard error
of the mean NLL.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import httpx

from loadtest.config import DEFAULT_TIMEOUT_S, DEFAULT_URL
from loadtest.runner import resolve_model

DEFAULT_CONTEXT = 512  # llama-perplexity's usual -c
DEFAULT_CONCURRENCY = 2  # windows in flight: the server batches them


@dataclass
class Perplexity:
    """The result of one run (`--out` writes it as JSON)."""

    file: str
    url: str
    model: str | None
    context: int
    second_half: bool
    text_tokens: int
    windows: int
    scored_tokens: int
    mean_nll: float
    ppl: float
    ppl_stderr: float
    seconds: float


def windows_of(tokens: list[int], context: int, max_windows: int | None, bos_id: int | None) -> list[list[int]]:
    """Consecutive full windows of `context` tokens (the first token replaced by `bos_id` if set)."""
    count = len(tokens) // context
    if max_windows is not None:
        count = min(count, max_windows)
    out = []
    for i in range(count):
        window = tokens[i * context : (i + 1) * context]
        if bos_id is not None:
            window[0] = bos_id
        out.append(window)
    return out


def scored_positions(context: int, second_half: bool) -> range:
    """Indices of a window whose token is scored (index 0 has no logprob)."""
    return range(context // 2 + 1 if second_half else 1, context)


def summarize(nlls: list[float]) -> tuple[float, float, float]:
    """(mean NLL, perplexity, its standard error as llama-perplexity reports it)."""
    n = len(nlls)
    mean = sum(nlls) / n
    var = sum(x * x for x in nlls) / n - mean * mean
    stderr = math.sqrt(var / (n - 1)) if n > 1 and var > 0 else 0.0
    ppl = math.exp(mean)
    return mean, ppl, ppl * stderr


async def tokenize(client: httpx.AsyncClient, text: str, model: str | None) -> list[int]:
    """The server's tokens of `text`, no special tokens added. The body carries workmem's and
    vLLM's fields (`prompt`, `add_special_tokens`) and llama-server's (`content`, `add_special`)."""
    body = {"prompt": text, "add_special_tokens": False, "content": text, "add_special": False}
    if model:
        body["model"] = model
    r = await client.post("/tokenize", json=body)
    r.raise_for_status()
    return r.json()["tokens"]


async def window_logprobs(client: httpx.AsyncClient, window: list[int], model: str | None) -> list[float | None]:
    """The server's logprob of each token of `window` given the ones before it."""
    body = {"prompt": window, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0.0}
    if model:
        body["model"] = model
    r = await client.post("/v1/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"POST /v1/completions: HTTP {r.status_code}: {r.text[:300]}")
    lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    if len(lps) != len(window):
        raise RuntimeError(f"the server returned {len(lps)} logprobs for a {len(window)}-token prompt: it must "
                           "support echo with max_tokens 0 (prompt logprobs)")
    return lps


async def measure(args: argparse.Namespace) -> Perplexity:
    with open(args.file, encoding="utf-8") as f:
        text = f.read()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers, timeout=args.timeout) as client:
        model, _ = await resolve_model(client, args.model)
        tokens = await tokenize(client, text, model)
        windows = windows_of(tokens, args.context, args.max_windows, args.bos_id)
        if not windows:
            raise ValueError(f"{args.file} has {len(tokens)} tokens: fewer than one --context {args.context} window")
        start = time.monotonic()
        gate = asyncio.Semaphore(args.concurrency)

        async def one(window: list[int]) -> list[float | None]:
            async with gate:
                return await window_logprobs(client, window, model)

        results = await asyncio.gather(*(one(w) for w in windows))
    keep = scored_positions(args.context, args.second_half)
    nlls = [-lps[j] for lps in results for j in keep]
    mean, ppl, err = summarize(nlls)
    return Perplexity(args.file, args.url, model, args.context, args.second_half, len(tokens), len(windows),
                      len(nlls), mean, ppl, err, time.monotonic() - start)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.perplexity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="a UTF-8 text file")
    p.add_argument("--url", default=DEFAULT_URL, help=f"server base URL (default {DEFAULT_URL})")
    p.add_argument("--model", default=None, help="model id (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                   help=f"tokens per window, as llama-perplexity's -c (default {DEFAULT_CONTEXT})")
    p.add_argument("--second-half", action="store_true",
                   help="score only the second half of each window, as llama-perplexity does")
    p.add_argument("--max-windows", type=int, default=None, help="at most this many windows (llama-perplexity's --chunks)")
    p.add_argument("--bos-id", type=int, default=None,
                   help="replace each window's first token by this id (llama-perplexity does for models adding BOS)")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help=f"windows in flight (default {DEFAULT_CONCURRENCY})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="per request, seconds")
    p.add_argument("--out", default=None, help="write the result JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.context < 4 or args.concurrency < 1 or (args.max_windows is not None and args.max_windows < 1):
        print("perplexity: error: --context must be >= 4, --concurrency and --max-windows >= 1", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(measure(args))
    except (OSError, ValueError, RuntimeError, httpx.HTTPError, KeyError) as exc:
        print(f"perplexity: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    scored = "second half of each window" if result.second_half else "all but each window's first token"
    print(f"{result.file}: {result.text_tokens} tokens, {result.windows} windows of {result.context} "
          f"({scored}: {result.scored_tokens} tokens scored) on {result.url} ({result.model})")
    print(f"PPL = {result.ppl:.4f} +/- {result.ppl_stderr:.4f}   mean NLL {result.mean_nll:.5f}   "
          f"{result.seconds:.1f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(asdict(result), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
