"""What grammar-constrained decoding adds to a decode step (engine level, no HTTP).

1. The pieces on their own, per step for B constrained rows replaying the model's own
   greedy output: the batch's bitmask (one llguidance call), the mask applied to
   [B, vocab] logits, advancing the matchers by one token.
2. Whole decode steps of B sequences, all free vs all following a JSON schema (long enough
   that none finishes while timed), same prompts, greedy.

    python -m loadtest.grammar_overhead [--model PATH] [--batch 1 16] [--steps 32]
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from model.sampling import GrammarSpec, SamplingParams, SamplingRow, TokenMask, process_logits
from server.engine import EngineConfig, LLMEngine
from server.engine.grammar import BitmaskFiller, GrammarState

SCHEMA = {"type": "object", "properties": {
    "items": {"type": "array", "minItems": 500, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False}
SPEC = GrammarSpec("json_schema", json.dumps(SCHEMA))
_runs = itertools.count()


def model_tokens(engine: LLMEngine, n: int) -> list[int]:
    """The model's own greedy output under the schema: the token stream the pieces replay."""
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "List people as JSON."}])
    engine.add_request("tokens", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, structured=SPEC))
    tokens = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    return tokens


def pieces(engine: LLMEngine, batch: int, tokens: list[int]) -> dict[str, float]:
    """Median ms per step of each piece, `batch` matchers replaying the model's tokens."""
    vocab = engine.model_config.vocab_size
    states = [GrammarState(engine.grammars.matcher(SPEC)) for _ in range(batch)]
    fill, rows = BitmaskFiller(), [SamplingRow(SamplingParams(temperature=0), [], []) for _ in range(batch)]
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0))
    times = {"bitmask": [], "apply": [], "advance": []}
    for i in range(len(tokens)):
        t0 = time.perf_counter()
        bitmask = fill(states, vocab)
        t1 = time.perf_counter()
        process_logits(logits, rows, TokenMask(list(range(batch)), bitmask))
        t2 = time.perf_counter()
        process_logits(logits, rows)
        t3 = time.perf_counter()
        for s in states:
            s.sync(tokens[: i + 1], 0)
        t4 = time.perf_counter()
        times["bitmask"].append(t1 - t0)
        times["apply"].append((t2 - t1) - (t3 - t2))  # over process_logits without a mask
        times["advance"].append(t4 - t3)
    assert not any(s.failed for s in states)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def steps(engine: LLMEngine, batch: int, n: int, constrained: bool) -> float:
    """Median ms of decode steps with `batch` sequences running."""
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "List people as JSON."}])
    run = next(_runs)
    params = SamplingParams(temperature=0, max_tokens=n + 8, ignore_eos=True,
                            structured=SPEC if constrained else None)
    for i in range(batch):
        engine.add_request(f"{run}-{constrained}-{i}", prompt, params)
    times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        out = engine.step()
        dt = time.perf_counter() - t
        if len(out) == batch and all(not o.finished for o in out) and all(len(o.new_token_ids) == 1 for o in out):
            times.append(dt)
    times = times[2:]  # the first decode steps warm caches up
    assert len(times) >= n // 2, f"only {len(times)} full-batch steps"
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3,
                        help="free and constrained runs alternate this many times; the fastest of each counts")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    from server.default_model import default_model_path

    engine = LLMEngine(EngineConfig(model=args.model or str(default_model_path()), dtype=args.dtype,
                                    max_model_len=1024, max_num_seqs=max(args.batch), num_threads=args.threads))
    t = time.perf_counter()
    engine.grammars.matcher(SPEC)
    print(f"vocab {engine.model_config.vocab_size}; first compile (tokenizer + schema) {1000 * (time.perf_counter() - t):.0f} ms")
    tokens = model_tokens(engine, args.steps)
    print(f"replayed output: {engine.tokenizer.decode(tokens)[:60]!r}...")
    for b in args.batch:
        p = min((pieces(engine, b, tokens) for _ in range(args.repeats)), key=lambda d: sum(d.values()))
        runs = [(steps(engine, b, args.steps, False), steps(engine, b, args.steps, True)) for _ in range(args.repeats)]
        free, constrained = min(r[0] for r in runs), min(r[1] for r in runs)
        print(f"batch {b:2d}: bitmask {p['bitmask']:.3f} ms, apply {p['apply']:.3f} ms, advance {p['advance']:.3f} ms "
              f"| decode step free {free:.1f} ms, constrained {constrained:.1f} ms "
              f"(+{constrained - free:.1f} ms, {100 * (constrained / free - 1):+.0f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
