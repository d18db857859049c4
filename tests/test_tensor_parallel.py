"""Tensor parallelism on the CPU: two ranks over gloo on loopback (rank 0 spawns rank 1)
against the same checkpoint on one rank. Greedy tokens must be identical and logprobs within
1e-4 (float32: only the order of the all-reduced partial sums differs)."""
from __future__ import annotations

from pathlib import Path

import pytest

from model.sampling import SamplingParams
from server.engine import LLM

LOGPROB_TOL = 1e-4
MAX_MODEL_LEN = 256
ENGINE = dict(dtype="float32", device="cpu", num_kv_blocks=64, max_model_len=MAX_MODEL_LEN, num_threads=1)
PROMPTS = [[5, 17, 42, 99, 7], list(range(3, 40)), [200, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]


def _generate(model_dir: Path, tp: int) -> list:
    """Greedy with top-2 logprobs, chunked prefill beside decodes; then seeded n=2 sampling
    (its forks copy KV blocks: the step broadcast carries the copies)."""
    with LLM(str(model_dir), tensor_parallel_size=tp, max_num_batched_tokens=16, **ENGINE) as llm:
        greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True))
        sampled = llm.generate([PROMPTS[1]], SamplingParams(temperature=0.8, n=2, seed=7, max_tokens=20,
                                                             ignore_eos=True))
    return greedy + sampled


def _assert_same(ref, out) -> None:
    for a, b in zip(ref, out, strict=True):
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            assert cb.token_ids == ca.token_ids
            if ca.logprobs is None:
                continue
            for la, lb in zip(ca.logprobs, cb.logprobs, strict=True):
                assert la.keys() == lb.keys()
                assert max(abs(la[t] - lb[t]) for t in la) < LOGPROB_TOL


def test_offline_tp2_matches_tp1(tiny_checkpoint):
    model = tiny_checkpoint("llama")
    ref, out = _generate(model, 1), _generate(model, 2)
    assert len({tuple(r.outputs[0].token_ids) for r in ref}) == len(ref)  # distinct prompts, distinct outputs
    _assert_same(ref, out)


def test_tied_embeddings_and_qkv_bias_shard(tiny_checkpoint):
    """qwen2: the tied LM head reads the vocab shard of the embedding; q/k/v biases split by head."""
    model = tiny_checkpoint("qwen2")
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=1, ignore_eos=True)
    with LLM(str(model), **ENGINE) as one, LLM(str(model), tensor_parallel_size=2, **ENGINE) as two:
        _assert_same(one.generate(PROMPTS[:2], params), two.generate(PROMPTS[:2], params))


@pytest.mark.parametrize("arch, kwargs, message", [
    ("qwen3", {}, "must divide the model's KV heads (1)"),
    ("gpt2", {}, "supports the Llama family"),
    ("llama", {"tensor_parallel_size": 3}, "attention heads (4), KV heads (2), intermediate size (128)"),
    ("llama", {"quantization": "int4"}, "quantization int4 cannot be sharded"),
])
def test_unsupported_combinations_fail_before_starting_ranks(tiny_checkpoint, arch, kwargs, message):
    kwargs = {"tensor_parallel_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLM(str(tiny_checkpoint(arch)), **kwargs, **ENGINE)
