"""Decode attention alone, bf16 vs int8 KV pools (model/kv_quant.py): `python -m loadtest.kv_attention`.

One decoding sequence per context length; every layer has its own pool (as a model's layers
do, so the pools are not cache-resident), blocks in a random order. The two dtypes are timed
interleaved, best of `--reps` rounds, so a noisy machine affects both alike. Prints ms per
step over all layers and the int8 / bf16 speed ratio. A benchmark, never a test.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from model.attention import NativeCPUPagedAttention, SeqAttention, TorchPagedAttention, build_attention_metadata
from model.kv_quant import quantize, rotates
from model.native import native_kernels


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.kv_attention", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--contexts", default="256,4096,8192", help="context lengths (default: %(default)s)")
    add("--layers", type=int, default=30, help="pools, one per layer (default: %(default)s, SmolLM2-135M)")
    add("--heads", type=int, default=9, help="query heads (default: %(default)s)")
    add("--kv-heads", type=int, default=3, help="kv heads (default: %(default)s)")
    add("--head-dim", type=int, default=64, help="head size (default: %(default)s)")
    add("--block-size", type=int, default=16, help="tokens per block (default: %(default)s)")
    add("--reps", type=int, default=6, help="timed rounds, best kept (default: %(default)s)")
    add("--query-dtype", default="bfloat16", choices=("bfloat16", "float32"),
        help="the model's dtype: float32 is what `--dtype auto` runs on a CPU without bf16 matmul, "
             "where the bf16 pool is read under float32 queries (default: %(default)s)")
    return p.parse_args(argv)


def _case(args: argparse.Namespace, ctx: int, int8: bool):
    """(attention, q, k, pools k/v [layers, ...], meta) for one sequence of `ctx` tokens."""
    nb = -(-ctx // args.block_size)
    shape = (args.layers, nb, args.block_size, args.kv_heads, args.head_dim)
    k, v = torch.randn(shape).bfloat16(), torch.randn(shape).bfloat16()
    if int8:
        k, v = quantize(k, None, rotates(args.head_dim)), quantize(v, None, rotates(args.head_dim))  # format 2 rows
    table = torch.randperm(nb)
    last = ctx - 1
    slot = torch.tensor([int(table[last // args.block_size]) * args.block_size + last % args.block_size])
    meta = build_attention_metadata([SeqAttention(1, ctx, table)], slot, args.block_size, torch.device("cpu"))
    ops = native_kernels()
    d = args.head_dim
    attn = (TorchPagedAttention(args.heads, args.kv_heads, d, d**-0.5) if ops is None
            else NativeCPUPagedAttention(args.heads, args.kv_heads, d, d**-0.5, ops))
    dtype = getattr(torch, args.query_dtype)
    q, new = torch.randn(1, args.heads, d, dtype=dtype), torch.randn(1, args.kv_heads, d, dtype=dtype)
    return attn, q, new, k, v, meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    ops = native_kernels()
    print(f"# kernels: {'torch' if ops is None else 'native ' + ops.variant}, threads {torch.get_num_threads()}, "
          f"{args.query_dtype} queries")
    contexts = [int(c) for c in args.contexts.split(",")]
    cases = {(ctx, int8): _case(args, ctx, int8) for ctx in contexts for int8 in (False, True)}
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(args.reps):
        for key, (attn, q, new, k, v, meta) in cases.items():
            start = time.perf_counter()
            for layer in range(args.layers):
                attn.forward(q, new, new, k[layer], v[layer], meta)
            best[key] = min(best[key], (time.perf_counter() - start) * 1e3)
    for ctx in contexts:
        bf16, int8 = best[ctx, False], best[ctx, True]
        print(f"ctx {ctx}: {args.layers} layers' decode attention bf16 {bf16:.2f} ms, int8 {int8:.2f} ms "
              f"(int8 {bf16 / int8:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
