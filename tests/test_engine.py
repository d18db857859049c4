"""Engine behaviour on a real (tiny, random) checkpoint and its real tokenizer: stop
strings, n > 1, seeds, logprobs, aborts, limits and clear errors."""
from __future__ import annotations

import pytest
import torch

from model.sampling import SamplingParams
from server.engine import LLM, EngineConfig, LLMEngine
from tests.checkpoints import VOCAB


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint("llama")), dtype="float32", device="cpu", block_size=4, max_model_len=128)


def prompts(n: int, length: int = 12, seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=gen).tolist() for _ in range(n)]


def test_text_prompt_and_text_output_agree(llm):
    (out,) = llm.generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert out.prompt_token_ids == llm.tokenizer.encode("The quick brown fox")
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_stop_string_across_tokens_is_not_emitted(llm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompt = prompts(1, seed=11)
    (full,) = llm.generate(prompt, params)
    # A stop string that starts inside one token's text and ends in a later one.
    pieces = [llm.tokenizer.decode([t]) for t in full.token_ids]
    first = next(i for i, p in enumerate(pieces[:-2]) if len(p) >= 2 and pieces[i + 1])
    start = sum(len(p) for p in pieces[:first]) + len(pieces[first]) - 1
    stop = full.text[start : start + 2]
    (out,) = llm.generate(prompt, SamplingParams(**{**params.__dict__, "stop": [stop]}))
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]
    assert stop not in out.text


def test_greedy_n_children_agree_and_sampled_children_differ(llm):
    (greedy,) = llm.generate(prompts(1), SamplingParams(n=3, temperature=0, max_tokens=8, ignore_eos=True))
    assert len(greedy.outputs) == 3
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids == greedy.outputs[2].token_ids
    (sampled,) = llm.generate(prompts(1), SamplingParams(n=4, temperature=1.5, max_tokens=8, seed=5, ignore_eos=True))
    assert len({tuple(o.token_ids) for o in sampled.outputs}) > 1
    assert llm.engine.pool.num_used == 0


def test_seed_is_independent_of_batch(llm):
    seeded = SamplingParams(temperature=1.0, max_tokens=12, seed=1234, ignore_eos=True)
    noise = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    (alone,) = llm.generate(prompts(1), seeded)
    batch = llm.generate(prompts(3, seed=9) + prompts(1), [noise, noise, noise, seeded])
    assert batch[-1].token_ids == alone.token_ids
    (again_n2,) = llm.generate(prompts(1), SamplingParams(**{**seeded.__dict__, "n": 2}))
    assert again_n2.outputs[0].token_ids == alone.token_ids


def test_top_logprobs_include_sampled_token(llm):
    (out,) = llm.generate(prompts(1), SamplingParams(temperature=1.0, seed=0, max_tokens=6, logprobs=3, ignore_eos=True))
    assert len(out.logprobs) == 6
    for entry, token in zip(out.logprobs, out.token_ids):
        assert token in entry and 3 <= len(entry) <= 4
        assert all(v <= 0 for v in entry.values())


def test_max_tokens_none_runs_to_max_model_len(llm):
    (out,) = llm.generate(prompts(1, length=120), SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_abort_mid_decode_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("a", prompts(1)[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.add_request("b", prompts(1, seed=4)[0], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.pool.num_used > 0
    (final,) = engine.abort("a")
    assert final.finished and final.finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
    assert engine.pool.num_used == 0
    assert engine.abort("a") == []  # already gone: nothing to do


def test_bad_requests_get_clear_errors(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match=r"128 tokens but max_model_len is 128"):
        engine.add_request("long", [1] * 128, SamplingParams())
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match=r"\[0, 384\)"):
        engine.add_request("oov", [VOCAB + 5], SamplingParams())
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request("bias", [1, 2], SamplingParams(logit_bias={VOCAB + 1: 1.0}))
    assert not engine.has_unfinished()


def test_pool_too_small_for_max_model_len_refuses_to_start(tiny_checkpoint):
    config = EngineConfig(model=str(tiny_checkpoint("llama")), dtype="float32", device="cpu",
                          block_size=16, num_kv_blocks=4, max_model_len=128)
    with pytest.raises(ValueError, match=r"cannot hold one sequence of max_model_len=128 \(8 blocks"):
        LLMEngine(config)
