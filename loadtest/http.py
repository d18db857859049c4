"""The old HTTP load test's flags, kept working: concurrent streaming completions.

    python -m loadtest.http --url http://127.0.0.1:8000 --concurrency 16 --requests 32

Now a front-end to `python -m loadtest` (= `workmem bench serve`): the `random` workload on
/v1/completions, greedy, `ignore_eos`, no warm-up. `--requests` -> `--num-requests`,
`--max-tokens` -> `--output-len`, `--prompt-repeats` sentences -> `--input-len`
(WORDS_PER_REPEAT words each), `--json` -> `--out` (the new result JSON). Any other flag of
`python -m loadtest` passes through.
"""
from __future__ import annotations

import argparse

from loadtest.cli import main as bench_main

WORDS_PER_REPEAT = 15  # the old filler sentence was ~15 tokens
DEFAULT_MAX_TOKENS = 128
DEFAULT_PROMPT_REPEATS = 9  # ~136 tokens, the BENCHMARKS.md workload


def translate(argv: list[str] | None) -> list[str]:
    """Old flags -> `python -m loadtest` flags (unknown ones pass through unchanged)."""
    p = argparse.ArgumentParser(prog="python -m loadtest.http", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=1, help="parallel streams (default 1)")
    p.add_argument("--requests", type=int, default=None, help="total requests (default: = concurrency)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens per request (default 128)")
    p.add_argument("--prompt-repeats", type=int, default=DEFAULT_PROMPT_REPEATS,
                   help="prompt length in filler sentences (9 ~ 136 tokens)")
    p.add_argument("--json", default=None, help="write the result JSON here")
    args, rest = p.parse_known_args(argv)
    out = ["--workload", "random", "--endpoint", "completions", "--warmup", "0",
           "--concurrency", str(args.concurrency), "--num-requests", str(args.requests or args.concurrency),
           "--output-len", str(args.max_tokens), "--input-len", str(args.prompt_repeats * WORDS_PER_REPEAT)]
    return out + (["--out", args.json] if args.json else []) + rest


def main(argv: list[str] | None = None) -> int:
    return bench_main(translate(argv))


if __name__ == "__main__":
    raise SystemExit(main())
