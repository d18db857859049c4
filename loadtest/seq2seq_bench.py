"""Encoder-decoder generation throughput: our engine (`server.engine.LLM`) vs transformers
`generate` run naively, on the same BART checkpoint, on CPU.

Prompts are random token ids (fixed seed) of `--input-len` tokens; every request generates
exactly `--output-len` tokens, greedy (EOS masked: `min_tokens` here, `min_new_tokens` there).
workmem: 1 stream (`--batch1-requests` requests one at a time) and `--streams` requests
submitted at once. transformers: `AutoModelForSeq2SeqLM.generate` one request at a time, and
the same `--streams` prompts as one static batch (equal lengths: no padding). Output tokens
per second of the generate calls only (the encoder's run included), after a warm-up; the
two systems alternate for `--rounds` rounds and the best round of each is reported.

Without `--model`, a random-weight BART in bart-base's shape (`--shape base`: 6+6 layers,
hidden 768, 12 heads, FFN 3072, vocab 50265) or a small one (`--shape small`) is built with
transformers into a temporary directory (no download). A benchmark, not a test:

    python -m loadtest.seq2seq_bench [--model DIR] [--dtype float32] [--streams 16]
    workmem bench seq2seq ...
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

SHAPES = {  # BartConfig fields of the random checkpoints
    "base": dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024),
    "small": dict(vocab_size=8192, d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024, max_position_embeddings=512),
}
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # BART's ids 0..3
WARMUP_TOKENS = 2
DEFAULT_ROUNDS = 2  # alternating rounds; the best of each is reported (a shared machine is noisy)


def build_random_bart(path: Path, shape: str) -> Path:
    """A random BART of `shape` (init_std weights: throughput only) and a word-level tokenizer."""
    import tokenizers
    import transformers as tf

    cfg = tf.BartConfig(**SHAPES[shape], forced_eos_token_id=None, forced_bos_token_id=None)
    torch.manual_seed(0)
    tf.BartForConditionalGeneration(cfg).save_pretrained(path)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)} | {f"t{i}": i for i in range(len(SPECIALS), cfg.vocab_size)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


def make_prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(len(SPECIALS), vocab) for _ in range(length - 2)] + [2] for _ in range(count)]


def load_ours(model: str, dtype: str, streams: int):
    from server.engine import LLM

    return LLM(model, dtype=dtype, device="cpu", max_num_seqs=max(streams, 1))


def ours_generate(llm, batch: list[list[int]], new: int) -> int:
    from model.sampling import SamplingParams

    outs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=new, min_tokens=new))
    return sum(len(o.token_ids) for o in outs)


def load_hf(model: str, dtype: str):
    import transformers as tf

    return tf.AutoModelForSeq2SeqLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()


@torch.inference_mode()
def hf_generate(net, batch: list[list[int]], new: int) -> int:
    ids = torch.tensor(batch)
    out = net.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                       max_new_tokens=new, min_new_tokens=new)
    return (out.shape[1] - 1) * out.shape[0]  # minus the decoder start token


def measure(generate, prompts: list[list[int]], b1: int, out_len: int) -> dict[str, float]:
    """Output tok/s one request at a time (`b1` requests), then all `prompts` at once."""
    start = time.perf_counter()
    tokens = sum(generate([p], out_len) for p in prompts[:b1])
    one = tokens / (time.perf_counter() - start)
    start = time.perf_counter()
    many = generate(prompts, out_len) / (time.perf_counter() - start)
    return {"1 stream": one, f"{len(prompts)} streams": many}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="workmem bench seq2seq", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="BART HF directory (default: a random one of --shape)")
    p.add_argument("--shape", default="base", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--input-len", type=int, default=64, help="encoder tokens per request (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=64, help="new tokens per request (default: %(default)s)")
    p.add_argument("--streams", type=int, default=16, help="requests at once (default: %(default)s)")
    p.add_argument("--batch1-requests", type=int, default=2, help="requests run one at a time (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="measurements per system, best kept "
                                                                      "(default: %(default)s)")
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_random_bart(Path(tmp), args.shape))
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        prompts = make_prompts(vocab, args.streams, args.input_len)
        systems = {"workmem": partial(ours_generate, load_ours(model, args.dtype, args.streams))}
        if not args.skip_hf:
            systems["transformers"] = partial(hf_generate, load_hf(model, args.dtype))
        best: dict[str, dict[str, float]] = {name: {} for name in systems}
        for generate in systems.values():
            generate(prompts[:1], WARMUP_TOKENS)
        for _ in range(args.rounds):  # the systems alternate, so a noisy spell hits both
            for name, generate in systems.items():
                for mode, tok_s in measure(generate, prompts, args.batch1_requests, args.output_len).items():
                    best[name][mode] = max(best[name].get(mode, 0.0), tok_s)
    print(f"{args.model or 'random BART ' + args.shape}: {args.input_len} encoder tokens, {args.output_len} new "
          f"tokens per request, {args.dtype}, torch threads {torch.get_num_threads()}")
    print("| system | mode | output tok/s |\n|---|---|---|")
    for system, rows in best.items():
        for mode, tok_s in rows.items():
            note = " (one static batch)" if system == "transformers" and mode != "1 stream" else ""
            print(f"| {system} | {mode}{note} | {tok_s:.1f} |")
    if "transformers" in best:
        for mode in best["workmem"]:
            print(f"workmem / transformers, {mode}: {best['workmem'][mode] / best['transformers'][mode]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
