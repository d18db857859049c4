"""Greedy parity with transformers on tiny random checkpoints of every architecture:
the same tokens and sampled-token logprobs within 1e-3, whatever the batch, block size,
memory pressure, chunking or prefix-cache hits."""
from __future__ import annotations

import pytest
import torch

from model.sampling import SamplingParams
from server.engine import LLM
from tests.checkpoints import ARCHS, VOCAB, load_reference, reference_greedy

MAX_NEW = 12
PROMPT_LENS = (3, 17, 40, 64, 9)
SHARED_PREFIX = 37  # tokens shared by the prefix-cache prompts (not block aligned)


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tiny_checkpoint):
    """(checkpoint dir, prompts, reference tokens, reference logprobs) for one architecture."""
    path = tiny_checkpoint(request.param)
    ref = load_reference(path)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    prefix = torch.randint(0, VOCAB, (SHARED_PREFIX,), generator=gen).tolist()
    prompts += [prefix + torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 20)]
    expected = [reference_greedy(ref, p, MAX_NEW) for p in prompts]
    return path, prompts, expected


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)


def assert_matches(outputs, expected):
    for out, (tokens, logprobs) in zip(outputs, expected):
        assert out.token_ids == tokens
        ours = [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, logprobs)) < 1e-3
        assert out.finish_reason == "length"


def test_default_config(case):
    path, prompts, expected = case
    llm = LLM(str(path), dtype="float32", device="cpu")
    assert_matches(llm.generate(prompts, GREEDY), expected)


def test_small_blocks_and_preemption(case):
    path, prompts, expected = case
    # 32 blocks of 4 tokens hold exactly one max_model_len sequence: the batch must preempt.
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=4, num_kv_blocks=32, max_model_len=128)
    assert_matches(llm.generate(prompts, GREEDY), expected)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.pool.num_used == 0


def test_chunked_prefill(case):
    path, prompts, expected = case
    llm = LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=7, block_size=8)
    assert_matches(llm.generate(prompts, GREEDY), expected)


def test_prefix_cache_hits(case):
    path, prompts, expected = case
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=4)
    first = llm.generate(prompts, GREEDY)
    again = llm.generate(prompts[::-1], GREEDY)[::-1]
    assert_matches(first, expected)
    assert_matches(again, expected)
    # Every full block of a repeated prompt is served from the cache (one token is left
    # to compute so there are logits to sample from).
    assert [o.num_cached_tokens for o in again] == [(len(p) - 1) // 4 * 4 for p in prompts]
    # A new prompt sharing 37 tokens with a finished one reuses its 9 full blocks.
    fresh = LLM(str(path), dtype="float32", device="cpu", block_size=4)
    fresh.generate([prompts[-2]], GREEDY)
    (shared,) = fresh.generate([prompts[-1]], GREEDY)
    assert shared.num_cached_tokens == 36
    assert_matches([shared], expected[-1:])


def test_bfloat16_close_to_reference(case):
    """bf16 is not bit-exact; the first greedy tokens agree and logprobs stay close."""
    path, prompts, expected = case
    llm = LLM(str(path), dtype="bfloat16", device="cpu")
    outputs = llm.generate(prompts, GREEDY)
    agree = sum(o.token_ids[0] == e[0][0] for o, e in zip(outputs, expected))
    assert agree >= len(prompts) - 1


def test_torch_kernel_backend(case):
    """The reference SDPA backend (what runs where no C compiler is) holds parity too;
    the tests above run the default backend, the native CPU decode kernel."""
    path, prompts, expected = case
    llm = LLM(str(path), dtype="float32", device="cpu", kernel_backend="torch", block_size=4)
    assert llm.engine.kernel_backend == "torch"
    assert_matches(llm.generate(prompts, GREEDY), expected)
