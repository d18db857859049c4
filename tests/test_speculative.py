"""Speculative decoding by n-gram drafting (server/engine/speculate.py): the n-gram index,
the rejection rule's output distribution, block accounting under random workloads with
drafts that are partly wrong (the context-sum mock of test_scheduler, so a wrong K/V or a
leaked block shows), and token-identical greedy output on a tiny checkpoint in batches
that mix drafting rows with rows that do not draft (grammar, logprobs, n > 1), under
chunked prefill, preemption, stop strings and aborts."""
from __future__ import annotations

import random

import pytest
import torch

from model.sampling import GrammarSpec, Sampler, SamplingParams, SamplingRow
from server.engine import LLM, EngineConfig, LLMEngine
from server.engine.sessions import Session
from server.engine.speculate import NgramIndex, SpeculativeConfig, Speculator, verify
from tests.test_scheduler import BLOCK, VOCAB, check_kv, check_pool, make_loaded, reference

MAX_MODEL_LEN = 160


# -- drafting ----------------------------------------------------------------------------
def test_ngram_index_proposes_the_longest_latest_match_and_grows():
    index = NgramIndex(2, 3)
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3]
    assert index.propose(tokens, 2) == [7, 5]  # [1, 2, 3] last seen ending at 7
    tokens.append(7)
    assert index.propose(tokens, 3) == [5, 1, 2]  # [2, 3, 7]
    tokens += [8, 8]
    assert index.propose(tokens, 4) == []  # [7, 8, 8], [8, 8] never seen before
    tokens.append(8)
    assert index.propose(tokens, 4) == [8]  # [8, 8] ended at 15 (the run overlaps itself)


def test_speculator_pauses_where_drafts_miss_and_retries():
    cfg = SpeculativeConfig("ngram", num_speculative_tokens=3, ngram_min=1, ngram_max=1, min_acceptance=0.5,
                            retry_steps=2)
    spec = Speculator(cfg)
    seq = type("S", (), {})()
    seq.grammar, seq.params, seq.draft_state, seq.token_ids = None, SamplingParams(), None, [4, 5, 4]
    assert spec.propose(seq, 8, 1) == [5, 4]
    assert spec.propose(seq, 8, cfg.max_batch) == []  # a wide batch does not draft
    spec.record(seq, 2, 0)
    spec.record(seq, 2, 0)  # moving average below 0.5: two steps off
    assert [spec.propose(seq, 8, 1) for _ in range(3)] == [[], [], [5, 4]]
    assert (spec.stats.drafted, spec.stats.accepted, spec.stats.verifies) == (4, 0, 2)


# -- the rejection rule ------------------------------------------------------------------
def _tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


@pytest.mark.parametrize("seeded", [False, True])
def test_verify_keeps_the_sampler_distribution(seeded):
    """Each emitted token follows the sampler's own distribution at its position (given the
    draft tokens before it were accepted): total variation within sampling noise."""
    vocab, samples = 8, 30000
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, vocab, generator=gen) * 1.5  # positions 0..2 of a draft of 2
    params = SamplingParams(temperature=0.9, top_k=6)
    scaled = logits / params.temperature
    probs = torch.where(scaled >= scaled.topk(6, dim=-1).values[:, -1:], scaled, float("-inf")).softmax(-1)
    draft = [int(probs[0].argsort()[-2]), int(probs[1].argmax())]  # a likely (not the likeliest) token, then the top
    row_gen = torch.Generator().manual_seed(11) if seeded else None
    rows = [SamplingRow(params, (), (), generator=row_gen) for _ in range(3)] * samples
    out = verify(Sampler(seed=5), logits.repeat(samples, 1), rows, [draft] * samples)
    first = torch.bincount(torch.tensor([o[0] for o in out]), minlength=vocab).float()
    assert _tv(first, probs[0]) < 0.02
    after1 = [o[1] for o in out if o[0] == draft[0]]
    assert _tv(torch.bincount(torch.tensor(after1), minlength=vocab).float(), probs[1]) < 0.04
    after2 = [o[2] for o in out if o[:2] == draft]
    assert _tv(torch.bincount(torch.tensor(after2), minlength=vocab).float(), probs[2]) < 0.05
    assert all(1 <= len(o) <= 3 for o in out)


def test_verify_greedy_accepts_the_argmax_walk():
    logits = torch.zeros(4, 5)
    logits[0, 2] = logits[1, 3] = logits[2, 0] = logits[3, 4] = 1.0
    rows = [SamplingRow(SamplingParams(temperature=0), (), ()) for _ in range(4)]
    assert verify(Sampler(), logits, rows, [[2, 3, 1]]) == [[2, 3, 0]]  # third rejected: the argmax instead
    assert verify(Sampler(), logits, rows, [[2, 3, 0]]) == [[2, 3, 0, 4]]  # all accepted + bonus
    assert verify(Sampler(), logits[:2], rows[:2], [[1]]) == [[2]]


# -- block accounting with partly wrong drafts (mock model) ---------------------------------
def oracle_drafts(engine: LLMEngine, rng: random.Random) -> None:
    """Replace n-gram drafting by the mock's true continuation with a token sometimes
    corrupted, so drafts are accepted in part (every length) and rejected in part."""
    spec = engine.scheduler.speculator

    def propose(seq, limit, num_decoding):
        k = min(limit, rng.randint(0, spec.config.num_speculative_tokens))
        if k < 1:
            return []
        draft = reference(seq.token_ids, k)
        if rng.random() < 0.6:
            draft[rng.randrange(k)] = rng.randrange(VOCAB)
        return draft

    spec.propose = propose


def mock_engine(rng: random.Random, mml: int) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model="mock", dtype="float32", device="cpu", block_size=BLOCK,
            num_kv_blocks=-(-mml // BLOCK) + rng.choice([0, 1, 3, 10]), max_num_seqs=rng.randint(1, 6),
            max_num_batched_tokens=rng.randint(1, 20), max_model_len=mml, enable_prefix_caching=rng.random() < 0.8,
            speculative_method="ngram", num_speculative_tokens=rng.randint(1, 6),
        ),
        loaded=make_loaded(),
    )


@pytest.mark.parametrize("seed", range(16))
def test_random_workloads_with_drafts_keep_pool_and_kv_consistent(seed):
    """Random arrivals, aborts, n > 1, chunking, preemption and stop tokens on tiny pools,
    with drafts partly right: pool accounting and K/V hold after every step, no block is
    leaked, and greedy output is the reference's, cut at its first stop token."""
    rng = random.Random(seed)
    mml = rng.choice([16, 24, 40])
    engine = mock_engine(rng, mml)
    oracle_drafts(engine, rng)
    pending, requests = [], {}
    for i in range(rng.randint(2, 8)):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, mml - 1))]
        stop = [rng.randrange(VOCAB)] if rng.random() < 0.5 else []
        params = SamplingParams(n=rng.randint(1, min(3, engine.config.max_num_seqs)), max_tokens=rng.randint(1, 20),
                                temperature=0.0 if rng.random() < 0.6 else 3.0, seed=rng.randrange(1000),
                                ignore_eos=True, stop_token_ids=stop)
        pending.append((rng.randint(0, 12), f"r{i}", prompt, params))
        requests[f"r{i}"] = (prompt, params)
    tokens, reasons, step = {}, {}, 0
    while pending or engine.has_unfinished():
        for item in [p for p in pending if p[0] <= step]:
            engine.add_request(item[1], item[2], item[3])
            pending.remove(item)
        if rng.random() < 0.05 and engine.scheduler.requests:
            for out in engine.abort(rng.choice(sorted(engine.scheduler.requests))):
                reasons[(out.request_id, out.index)] = out.finish_reason
            check_pool(engine)
        for out in engine.step():
            key = (out.request_id, out.index)
            assert key not in reasons
            tokens.setdefault(key, []).extend(out.new_token_ids)
            if out.finished:
                reasons[key] = out.finish_reason
        check_pool(engine)
        check_kv(engine)
        step += 1
        assert step < 2000, "no progress"
    assert engine.pool.num_used == 0 and engine.scheduler.requests == {}
    for (rid, index), reason in reasons.items():
        if reason == "abort":
            continue
        prompt, params = requests[rid]
        got, limit = tokens.get((rid, index), []), min(params.max_tokens, mml - len(prompt))
        stops = [j for j, t in enumerate(got) if t in params.stop_token_ids]
        assert stops in ([], [len(got) - 1]), "tokens after a stop token"
        assert reason == ("stop" if stops else "length")
        assert len(got) == limit or stops
        if params.temperature == 0.0:
            assert got == reference(prompt, len(got))


# -- a tiny checkpoint: greedy output token-identical, beside rows that do not draft ----------
def copy_prompts(vocab: int) -> list[list[int]]:
    """Prompts that repeat a random passage (so drafts have something to copy)."""
    gen = torch.Generator().manual_seed(5)
    prompts = []
    for n, reps in ((6, 4), (11, 3), (23, 2), (3, 8)):
        passage = torch.randint(3, vocab, (n,), generator=gen).tolist()
        prompts.append(passage * reps + passage[: n // 2])
    return prompts


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    """(checkpoint, a plain LLM, copy-heavy prompts, their plain greedy tokens)."""
    path = str(tiny_checkpoint("llama"))
    plain = LLM(path, dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN)
    prompts = copy_prompts(plain.engine.model_config.vocab_size)
    return path, plain, prompts, [o.token_ids for o in plain.generate(prompts, GREEDY)]


def spec_llm(path: str, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", MAX_MODEL_LEN)
    return LLM(path, dtype="float32", device="cpu", speculative_method="ngram", **kwargs)


GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.mark.parametrize("kwargs", [
    {},
    {"num_speculative_tokens": 7, "ngram_min": 1, "ngram_max": 2},
    {"max_num_batched_tokens": 7, "block_size": 4},  # chunked prefill, drafts cut by the budget
    {"block_size": 4, "num_kv_blocks": 41},  # one max_model_len sequence fits: preemption
], ids=["default", "long-drafts", "chunked", "preempting"])
def test_greedy_output_is_token_identical(tiny, kwargs):
    path, _, prompts, want = tiny
    llm = spec_llm(path, **kwargs)
    got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == want
    stats = llm.engine.stats()
    assert stats.spec_accepted_tokens > 0, "nothing was accepted: the test would not see a wrong acceptance"
    assert llm.engine.pool.num_used == 0
    llm.engine.pool.check_invariants()
    if "num_kv_blocks" in kwargs:
        assert llm.engine.scheduler.num_preemptions > 0


def test_mixed_batch_matches_plain_decoding(tiny):
    """Drafting rows (greedy with stop strings, penalties, min_tokens; seeded sampling; n > 1)
    beside rows that never draft (a grammar, logprobs): every greedy and every grammar or
    logprobs row gets the plain engine's tokens; sampled rows finish properly."""
    path, plain, prompts, plain_tokens = tiny
    text = plain.tokenizer.decode(plain_tokens[1])
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # a stop string inside the greedy output
    greedy = [
        GREEDY,
        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=[stop]),
        SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(temperature=0, max_tokens=25, min_tokens=20, logit_bias={7: 2.0}),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=12, structured=GrammarSpec("choice", '["aaa", "bab", "abba"]')),
    ]
    sampled = [SamplingParams(temperature=0.8, max_tokens=30, seed=4, n=2, ignore_eos=True),
               SamplingParams(temperature=1.0, top_p=0.9, max_tokens=30)]
    batch = [prompts[i % len(prompts)] for i in range(len(greedy))]
    want = plain.generate(batch, greedy)
    llm = spec_llm(path, max_num_seqs=16)
    got = llm.generate(batch + prompts[:2], greedy + sampled)
    for w, g in zip(want, got):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
    assert [sorted(lp) for lp in got[4].logprobs] == [sorted(lp) for lp in want[4].logprobs]
    assert got[1].finish_reason == "stop" and stop not in got[1].text
    for out in got[len(greedy):]:
        for c in out.outputs:
            assert c.finish_reason in ("stop", "length") and c.token_ids
    assert llm.engine.stats().spec_accepted_tokens > 0
    assert llm.engine.pool.num_used == 0


def test_abort_while_drafting_frees_everything(tiny):
    path, _, prompts, _ = tiny
    llm = spec_llm(path, block_size=4)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY)
    drafted = False
    while engine.has_unfinished() and not drafted:
        engine.step()
        drafted = engine.stats().spec_verifies > 0
    assert drafted
    for i in range(len(prompts)):
        engine.abort(f"r{i}")
    assert not engine.has_unfinished() and engine.pool.num_used == 0
    engine.pool.check_invariants()


def test_session_turns_draft_from_the_conversation(tiny):
    """A session's second turn drafts from the whole transcript; a stop token inside an
    accepted draft ends the turn there: replies, transcript and resident KV as without drafts."""
    path, _, prompts, plain_tokens = tiny
    stop_token = plain_tokens[0][15]

    def converse(engine: LLMEngine):
        engine.sessions.create(Session("s", ttl=60))
        prompt, replies = prompts[0], []
        for turn in range(2):
            params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_token])
            engine.add_request(f"t{turn}", prompt, params, session_id="s", new_messages=[{"role": "user", "content": "x"}])
            replies.append([t for _ in iter(engine.has_unfinished, False) for o in engine.step() for t in o.new_token_ids])
            prompt = engine.sessions.get("s").token_ids + prompts[0]
        session = engine.sessions.get("s")
        return replies, session.token_ids, session.num_kv_tokens, len(session.block_table)

    config = dict(model=path, dtype="float32", device="cpu", block_size=4, max_model_len=MAX_MODEL_LEN)
    want = converse(LLMEngine(EngineConfig(**config)))
    engine = LLMEngine(EngineConfig(**config, speculative_method="ngram"))
    assert converse(engine) == want
    assert engine.stats().spec_accepted_tokens > 0


def test_cli_flags_and_metrics(tiny):
    import argparse

    from server.cli import add_engine_args, engine_config_from_args
    from server.metrics import Metrics

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--model", "m", "--speculative-method", "ngram", "--num-speculative-tokens", "6",
                              "--ngram-min", "1", "--ngram-max", "5", "--speculative-max-batch", "4"])
    spec = engine_config_from_args(args).speculative
    assert (spec.method, spec.num_speculative_tokens, spec.ngram_min, spec.ngram_max, spec.max_batch) == \
        ("ngram", 6, 1, 5, 4)
    with pytest.raises(ValueError, match="ngram_max"):
        EngineConfig(model="m", speculative_method="ngram", ngram_min=4, ngram_max=2)
    path, _, prompts, _ = tiny
    llm = spec_llm(path)
    llm.generate(prompts[:1], GREEDY)
    s = llm.engine.stats()
    text = Metrics(llm.engine.stats).render().decode()
    assert f"workmem_spec_draft_tokens_total {float(s.spec_draft_tokens)}" in text
    assert f"workmem_spec_accepted_tokens_total {float(s.spec_accepted_tokens)}" in text
    assert f"workmem_spec_mean_acceptance_length {1 + s.spec_accepted_tokens / s.spec_verifies}" in text
    assert 0 < s.spec_accepted_tokens <= s.spec_draft_tokens


def test_default_gguf_greedy_is_token_identical():
    """The default model (Q4_1 GGUF on the VNNI kernels, bf16): a verify step's positions run
    the same kernels as decodes, so greedy tokens match plain decoding exactly."""
    from server.default_model import default_model_path

    llm = LLM(str(default_model_path()), num_kv_blocks=128, max_model_len=512, speculative_method="ngram",
              enable_prefix_caching=False)
    passage = ("The old lighthouse stood at the edge of the cliff, its white paint peeling in long strips. "
               "Every night the keeper climbed the spiral stairs and watched the beam sweep across the water.")
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": m}])
               for m in ("Repeat this passage exactly:\n\n" + passage, "Write a haiku about autumn.")]
    params = SamplingParams(temperature=0, max_tokens=24)
    speculator, llm.engine.scheduler.speculator = llm.engine.scheduler.speculator, None
    want = [o.token_ids for o in llm.generate(prompts, params)]
    llm.engine.scheduler.speculator = speculator
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    assert speculator.stats.accepted > 0


def test_bench_speculative_runs_both_servers(capsys):
    """`workmem bench speculative` end to end, shortest shape: two real servers on the default
    model, the copy workload, one pair; the speculating server's counters reach the table."""
    from loadtest.speculative_bench import main as bench_main
    from tests.server_fixtures import free_port

    assert bench_main(["--pairs", "1", "--streams", "1", "--workloads", "copy", "--requests-per-stream", "1",
                       "--copy-max-tokens", "40", "--port", str(free_port())]) == 0
    out = capsys.readouterr().out
    assert "pair 1 copy x1 plain:" in out and "pair 1 copy x1 ngram:" in out
    (row,) = [line for line in out.splitlines() if line.startswith("| copy | 1 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    drafted, accepted = float(cells[5]), float(cells[6])
    assert 0 < accepted <= drafted and float(cells[7]) > 1
