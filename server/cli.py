"""`workmem` command line. Subcommands:
  generate   offline generation through the engine (no HTTP)
  bench      benchmarks (`workmem bench offline` = `python -m loadtest.offline`)
"""
from __future__ import annotations

import argparse
import sys
import time


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    from server.engine.config import (
        DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS,
    )

    parser.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (default auto)")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per KV block")
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="exact KV pool size in blocks")
    parser.add_argument("--kv-cache-memory", type=int, default=None, help="KV pool size in bytes")
    parser.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS)
    parser.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS)
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's context length")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--seed", type=int, default=None, help="seed of the shared sampling generator")


def llm_from_args(args: argparse.Namespace):
    from server.default_model import default_model_path
    from server.engine import LLM

    model = args.model or str(default_model_path())
    return LLM(
        model, dtype=args.dtype, device=args.device, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
        seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from model.sampling import SamplingParams

    llm = llm_from_args(args)
    tok = llm.tokenizer
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    ids = [
        tok.encode_chat([{"role": "user", "content": p}]) if args.chat else tok.encode(p)
        for p in prompts
    ]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.sampling_seed)
    start = time.perf_counter()
    outputs = llm.generate(ids, params)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs):
        print(f"> {prompt}\n{out.text}\n[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]")
    total = sum(len(o.token_ids) for o in outputs)
    print(f"{total} tokens in {elapsed:.2f} s ({total / elapsed:.1f} tok/s)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workmem", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="offline generation (no server)")
    add_engine_args(gen)
    gen.add_argument("prompt", nargs="*", help="prompts (default: one per line on stdin)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    offline = bench_sub.add_parser("offline", help="engine throughput vs transformers", add_help=False)
    offline.set_defaults(func=lambda a: _bench_offline(a.rest))
    offline.add_argument("rest", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"workmem: error: {exc}", file=sys.stderr)
        return 2


def _bench_offline(rest: list[str]) -> int:
    from loadtest.offline import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
