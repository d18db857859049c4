"""Prompt logprobs: each prompt token's logprob against transformers on a tiny random
checkpoint, whatever the batch, chunking, preemption or prefix cache; and the HTTP shapes
(legacy completions `echo` + `logprobs`, vLLM's `prompt_logprobs`) through the openai SDK."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch

from model.sampling import SamplingParams
from server.engine import LLM
from tests.checkpoints import VOCAB, load_reference
from tests.server_fixtures import make_app, running_engine

TOL = 1e-3
TOP_K = 3
PROMPT_LENS = (30, 5, 1, 45, 17)


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def reference(model_dir):
    """(prompts, per prompt: [L-1, vocab] transformers log-softmax of positions 0..L-2)."""
    ref = load_reference(model_dir)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    with torch.no_grad():
        lps = [ref(torch.tensor([p])).logits[0, :-1].float().log_softmax(-1) for p in prompts]
    return prompts, lps


def assert_scores(out, prompt, ref_lp, k=TOP_K):
    scores = out.prompt_logprobs
    assert len(scores) == len(prompt) and scores[0] is None
    for pos, (token, s) in enumerate(zip(prompt[1:], scores[1:])):
        row = ref_lp[pos]
        assert abs(s.logprobs[token] - row[token].item()) < TOL
        assert int((row > row[token] + TOL).sum()) + 1 <= s.rank <= int((row > row[token] - TOL).sum()) + 1
        top = list(s.logprobs.items())[:k]
        assert len(top) == k and all(abs(v - row[t].item()) < TOL for t, v in top)
        values = [v for _, v in top]
        assert abs(values[0] - row.max().item()) < TOL and values == sorted(values, reverse=True)


SCORE = SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=TOP_K)


@pytest.mark.parametrize("engine_kwargs", [
    {},  # whole prompts in one step
    {"max_num_batched_tokens": 7, "block_size": 8},  # chunked prefill
    {"max_prompt_logprob_tokens": 5, "block_size": 4},  # the scoring budget splits the batch
], ids=["batch", "chunked", "scoring-budget"])
def test_prompt_logprobs_match_transformers(model_dir, reference, engine_kwargs):
    prompts, ref = reference
    llm = LLM(str(model_dir), dtype="float32", device="cpu", **engine_kwargs)
    # scoring-only, scoring then generating (n=2), and a plain request in the same batch
    params = [SCORE, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=TOP_K, n=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)] * 2
    outs = llm.generate(prompts + prompts[:1], params[: len(prompts) + 1])
    for out, prompt, ref_lp, p in zip(outs, prompts + prompts[:1], ref + ref[:1], params):
        if p.prompt_logprobs is None:
            assert out.prompt_logprobs is None and len(out.token_ids) == 4
            continue
        assert_scores(out, prompt, ref_lp)
        assert [len(c.token_ids) for c in out.outputs] == [p.max_tokens] * p.n
        assert all(c.finish_reason == "length" for c in out.outputs)
    assert llm.engine.pool.num_used == 0


def test_cached_prefix_is_recomputed_for_scores(model_dir, reference):
    prompts, ref = reference
    llm = LLM(str(model_dir), dtype="float32", device="cpu", block_size=4)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1))  # every full block now cached
    outs = llm.generate(prompts, SCORE)
    assert [o.num_cached_tokens for o in outs] == [0] * len(prompts)  # cached KV has no logits
    for out, prompt, ref_lp in zip(outs, prompts, ref):
        assert_scores(out, prompt, ref_lp)
    again = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1))  # the cache still serves others
    assert [o.num_cached_tokens for o in again] == [(len(p) - 1) // 4 * 4 for p in prompts]


def test_preempted_scoring_resumes(model_dir, reference):
    prompts, ref = reference
    # 16 blocks of 4 tokens: the long prompts cannot all run at once and preempt each other
    llm = LLM(str(model_dir), dtype="float32", device="cpu", block_size=4, num_kv_blocks=16, max_model_len=64,
              max_num_batched_tokens=8)
    params = SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=TOP_K, ignore_eos=True)
    outs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    for out, prompt, ref_lp in zip(outs, prompts, ref):
        assert_scores(out, prompt, ref_lp)
    assert llm.engine.pool.num_used == 0


# ---------------------------------------------------------------- HTTP, through the openai SDK

@pytest.fixture(scope="module")
def engine(model_dir):
    with running_engine(model_dir, max_model_len=128, num_kv_blocks=64, block_size=8,
                        max_num_batched_tokens=16) as eng:
        yield eng


@pytest.fixture
async def oai(engine):
    app = make_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0)


@pytest.fixture(scope="module")
def score_ref(model_dir):
    ref = load_reference(model_dir)

    def lps(prompt: list[int]) -> list[float]:
        with torch.no_grad():
            row = ref(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)
        return [row[i, t].item() for i, t in enumerate(prompt[1:])]
    return lps


@pytest.mark.asyncio
async def test_echo_logprobs_max_tokens_0(oai, engine, score_ref):
    text = "The quick brown fox jumps over the lazy dog."
    prompt = engine.tokenizer.encode(text)
    r = await oai.completions.create(model="tiny-llama", prompt=text, echo=True, logprobs=2, max_tokens=0,
                                     temperature=0)
    (choice,) = r.choices
    lp = choice.logprobs
    assert choice.text == engine.tokenizer.decode(prompt, skip_special_tokens=False)
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], score_ref(prompt))) < TOL
    assert all(tok in top and 2 <= len(top) <= 3 for tok, top in zip(lp.tokens[1:], lp.top_logprobs[1:]))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


@pytest.mark.asyncio
async def test_echo_logprobs_cover_prompt_then_completion(oai, engine, score_ref):
    prompt = engine.tokenizer.encode("Working memory holds the conversation")
    body = dict(model="tiny-llama", prompt=prompt, echo=True, logprobs=1, max_tokens=3, temperature=0,
                extra_body={"ignore_eos": True})
    whole = (await oai.completions.create(**body)).choices[0]
    plain = (await oai.completions.create(**{**body, "echo": False})).choices[0]
    lp = whole.logprobs
    assert len(lp.tokens) == len(prompt) + 3
    assert lp.token_logprobs[len(prompt):] == pytest.approx(plain.logprobs.token_logprobs, abs=TOL)
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:len(prompt)], score_ref(prompt))) < TOL
    chunks = [c async for c in await oai.completions.create(**body, stream=True)]
    streamed = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.text for c in streamed) == whole.text
    tokens = [t for c in streamed if c.logprobs for t in c.logprobs.token_logprobs]
    offsets = [o for c in streamed if c.logprobs for o in c.logprobs.text_offset]
    assert tokens[0] is None and tokens[1:] == pytest.approx(lp.token_logprobs[1:], abs=TOL)
    assert offsets == lp.text_offset  # streamed offsets continue across chunks


@pytest.mark.asyncio
async def test_vllm_prompt_logprobs_field(oai, engine, score_ref):
    prompt = engine.tokenizer.encode("def add(a, b):")
    r = await oai.completions.create(model="tiny-llama", prompt=[prompt, prompt[:3]], max_tokens=2, n=2,
                                     temperature=0, extra_body={"prompt_logprobs": 2, "ignore_eos": True})
    assert len(r.choices) == 4
    for c in r.choices:
        p = prompt if c.index < 2 else prompt[:3]
        entries = c.model_extra["prompt_logprobs"]
        assert c.logprobs is None and len(entries) == len(p) and entries[0] is None
        for token, entry, ref_lp in zip(p[1:], entries[1:], score_ref(p)):
            assert abs(entry[str(token)]["logprob"] - ref_lp) < TOL and entry[str(token)]["rank"] >= 1
            assert sorted(v["rank"] for v in entry.values())[:2] == [1, 2] and len(entry) in (2, 3)
            assert all(isinstance(v["decoded_token"], str) for v in entry.values())


@pytest.mark.asyncio
@pytest.mark.parametrize("extra, param", [
    ({"max_tokens": 0}, "max_tokens"),  # nothing to score, nothing to generate
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    # 2 x 100 prompt tokens x (21 echoed + 6 prompt_logprobs) values: over the limit set below
    ({"max_tokens": 0, "echo": True, "logprobs": 20, "prompt_logprobs": 5, "prompt": [1] * 100, "n": 2}, "logprobs"),
    ({"max_tokens": 0, "echo": True, "min_tokens": 2}, "min_tokens"),
])
async def test_bad_combinations_are_400(oai, extra, param, monkeypatch):
    monkeypatch.setattr("server.api.serving.MAX_LOGPROB_VALUES", 2 * 100 * 27 - 1)
    body = {"model": "tiny-llama", "prompt": "x", **extra}
    with pytest.raises(openai.BadRequestError) as info:
        await oai.completions.create(**{k: v for k, v in body.items() if k in ("model", "prompt", "max_tokens")},
                                     extra_body={k: v for k, v in body.items()
                                                 if k not in ("model", "prompt", "max_tokens")})
    assert info.value.status_code == 400
    err = info.value.body
    assert param in (err.get("param") or "") or param in err["message"]


@pytest.mark.asyncio
async def test_lm_eval_loglikelihood_payload(oai, engine, score_ref):
    """lm-evaluation-harness's `local-completions` loglikelihood request: token-id prompts in
    one batch, echo, logprobs 1, max_tokens 1; it sums token_logprobs[ctxlen:-1]."""
    ctx = engine.tokenizer.encode("The quick brown fox")
    conts = [engine.tokenizer.encode(" jumps over"), engine.tokenizer.encode(" sleeps")]
    prompts = [ctx + c for c in conts]
    r = await oai.completions.create(model="tiny-llama", prompt=prompts, echo=True, logprobs=1, max_tokens=1,
                                     temperature=0, seed=1234)
    for choice, prompt in zip(sorted(r.choices, key=lambda c: c.index), prompts):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(prompt) + 1
        ours = sum(lp.token_logprobs[len(ctx):-1])
        assert abs(ours - sum(score_ref(prompt)[len(ctx) - 1:])) < TOL
        # its is_greedy check compares each token's logprob with the best of top_logprobs
        pairs = list(zip(lp.token_logprobs[len(ctx):-1], lp.top_logprobs[len(ctx):-1]))
        assert pairs and all(t in top.values() and t <= max(top.values()) for t, top in pairs)
