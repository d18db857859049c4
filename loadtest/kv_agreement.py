"""Greedy answers with one KV cache dtype vs another: `python -m loadtest.kv_agreement int8`.

Twelve chat prompts through the default model (or --model) in one batch, 32 greedy tokens
each, once as the reference (`--reference-kv`, `--reference-backend`: the model's own KV
dtype and the native kernels by default) and once with the given `--kv-cache-dtype` and
`--kernel-backend`; prints how many answers are token-identical and the chosen tokens'
logprob differences while they agree. A measurement, never a test.

`--perturb-kv EPS` gives the comparison's noise floor: the reference's own KV dtype and
backend, with every K/V value multiplied by (1 + EPS * N(0, 1)) before it is written. Where
activations are quantized (the native 4/8-bit kernels round them to int8), a perturbation as
small as 1e-6 already changes answers: compare int8 KV against that floor, or on
`--kernel-backend torch` (float activations) on both sides.
"""
from __future__ import annotations

import argparse
import sys

PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in one sentence.", "Write a haiku about the sea.",
    "How do I reverse a list in Python?", "What is 17 times 23?", "Name three primary colors.",
    "Why is the sky blue?", "Give me a tip for better sleep.", "What does HTTP stand for?",
    "Summarize the plot of Romeo and Juliet.", "What is a prime number?", "Translate 'good morning' into Spanish.",
]


def perturbed_kv(eps: float) -> None:
    """Multiply every K/V value by (1 + eps * N(0, 1)) before the attention writes it (seeded)."""
    import torch

    from model import attention

    gen = torch.Generator().manual_seed(0)
    jitter = lambda x: x * (1 + eps * torch.randn(x.shape, generator=gen)).to(x.dtype)

    def wrap(cls):
        forward = cls.__dict__["forward"]

        def perturbing(self, q, k, v, *rest, **kw):
            if type(self) is cls:  # once: the native backend's fallback calls the torch one's forward
                k, v = jitter(k), jitter(v)
            return forward(self, q, k, v, *rest, **kw)
        cls.forward = perturbing

    for cls in (attention.TorchPagedAttention, attention.NativeCPUPagedAttention):
        wrap(cls)


def answers(model: str, kv: str, backend: str, max_tokens: int) -> dict[str, list[tuple[int, float]]]:
    from model.sampling import SamplingParams
    from server.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=model, kv_cache_dtype=kv, kernel_backend=backend,
                                    kv_cache_memory=256 << 20, max_model_len=2048))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), engine.tokenizer.encode_chat([{"role": "user", "content": prompt}]), params)
    out: dict[str, list[tuple[int, float]]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend((t, lp[t]) for t, lp in zip(o.new_token_ids, o.new_logprobs))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.kv_agreement", description=__doc__.split("\n\n")[0])
    p.add_argument("kv_cache_dtype", help="auto | bfloat16 | float16 | float32 | int8")
    p.add_argument("--kernel-backend", default="auto", help="auto | torch | native (default: %(default)s)")
    p.add_argument("--reference-kv", default="auto", help="the reference's KV dtype (default: %(default)s)")
    p.add_argument("--reference-backend", default="auto", help="the reference's kernels (default: %(default)s)")
    p.add_argument("--perturb-kv", type=float, default=0.0, metavar="EPS",
                   help="instead: the reference with K/V perturbed by a relative EPS (the noise floor)")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M Q4_1")
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per answer (default: %(default)s)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from server.default_model import default_model_path

    model = args.model or str(default_model_path())
    ref = answers(model, args.reference_kv, args.reference_backend, args.max_tokens)
    if args.perturb_kv:
        perturbed_kv(args.perturb_kv)
        got = answers(model, args.reference_kv, args.reference_backend, args.max_tokens)
    else:
        got = answers(model, args.kv_cache_dtype, args.kernel_backend, args.max_tokens)
    same, diffs = 0, []
    for rid, want in ref.items():
        mine = got[rid]
        same += [t for t, _ in want] == [t for t, _ in mine]
        for (t_ref, lp_ref), (t, lp) in zip(want, mine):
            if t != t_ref:
                break
            diffs.append(abs(lp - lp_ref))
    print(f"identical {args.max_tokens}-token greedy answers: {same} of {len(ref)}; chosen-token logprob "
          f"|diff| while equal: mean {sum(diffs) / len(diffs):.4f}, max {max(diffs):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
