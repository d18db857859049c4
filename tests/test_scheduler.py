"""Scheduler + engine with a mock model that reads its whole context back from the paged
KV cache, so a wrong block table, a missed copy-on-write or a stale cached block changes
the generated tokens.

The mock writes (token id, position, 1) as each token's K and V, gathers every visible
key through the block tables like the reference attention, and predicts
    next = (sum over context of id * (position + 1) + context length) % VOCAB
`reference()` computes the same sequence in plain Python.
"""
from __future__ import annotations

import itertools
import random
from typing import NamedTuple

import pytest
import tokenizers
import torch
from torch import nn

from model.attention import AttentionMetadata, gather_blocks, write_kv
from model.config import ModelConfig
from model.loader import LoadedModel
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sequence import SequenceStatus

VOCAB = 64
BLOCK = 4
EOS = 0  # the tokenizer's eos; most tests set ignore_eos


class ContextSumModel(nn.Module):
    """Runner contract: forward(ids [T], positions [T], kv_cache (per layer (k, v)), meta) -> hidden [T, 4];
    compute_logits(hidden [S, 4]) -> float32 [S, VOCAB]."""

    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        num = input_ids.shape[0]
        kv = torch.stack(
            [input_ids.float(), positions.float(), torch.ones(num), torch.zeros(num)], dim=-1
        )[:, None, :]  # [T, 1, 4]
        k_cache, v_cache = kv_cache[0]
        write_kv(kv, kv, k_cache, v_cache, meta.slot_mapping)
        hidden = torch.zeros(num, 4)
        for g in meta.groups:
            keys = gather_blocks(k_cache, g.block_tables)[:, 0]  # [B, L, 4]
            mask = g.mask[:, 0] & g.valid[:, :, None]  # [B, max_q, L] visible keys of real queries
            slot = torch.arange(keys.shape[1], dtype=keys.dtype)
            written = (keys[..., 1] == slot) & (keys[..., 2] == 1)  # [B, L]
            assert bool((written[:, None, :] | ~mask).all()), "a visible key was never written"
            weight = keys[..., 0] * (keys[..., 1] + 1)  # [B, L]
            total = (mask.float() * weight[:, None, :]).sum(-1)  # [B, max_q]
            count = mask.float().sum(-1)
            rows = torch.stack([total, count, torch.zeros_like(total), torch.zeros_like(total)], -1)
            hidden[g.out_rows] = rows.reshape(-1, 4)[g.flat_index]
        assert torch.equal(hidden[:, 1], positions.float() + 1), "context length != position + 1"
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        target = (hidden[:, 0] + hidden[:, 1]).long() % VOCAB
        return torch.nn.functional.one_hot(target, VOCAB).float() * 10.0


def reference(prompt: list[int], num: int) -> list[int]:
    tokens = list(prompt)
    total = sum(t * (i + 1) for i, t in enumerate(tokens))
    for _ in range(num):
        nxt = (total + len(tokens)) % VOCAB
        total += nxt * (len(tokens) + 1)
        tokens.append(nxt)
    return tokens[len(prompt):]


def make_loaded() -> LoadedModel:
    config = ModelConfig(
        model_type="llama", vocab_size=VOCAB, hidden_size=4, intermediate_size=4, num_layers=1,
        num_heads=1, num_kv_heads=1, head_dim=4, max_position_embeddings=128, norm_eps=1e-6,
    )
    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return LoadedModel(ContextSumModel(), config, Tokenizer(backend, eos_token=f"t{EOS}"))


def make_engine(num_kv_blocks: int, max_num_seqs: int = 8, max_num_batched_tokens: int = 64,
                max_model_len: int = 72, prefix_caching: bool = True) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model="mock", dtype="float32", device="cpu", block_size=BLOCK, num_kv_blocks=num_kv_blocks,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len, enable_prefix_caching=prefix_caching,
        ),
        loaded=make_loaded(),
    )


def greedy(max_tokens: int, n: int = 1) -> SamplingParams:
    return SamplingParams(n=n, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def check_pool(engine: LLMEngine) -> None:
    """Pool accounting, and every reference is held by exactly one live sequence's block table."""
    engine.pool.check_invariants(s.block_table for seqs in engine.scheduler.requests.values() for s in seqs)


def check_kv(engine: LLMEngine) -> None:
    """Every running sequence's computed tokens sit in its own blocks' K/V, in order."""
    k_cache = engine.runner.kv_cache[0, 0, :, :, 0]  # [num_blocks, block_size, 4]
    for seq in engine.scheduler.running:
        pos = torch.arange(seq.num_computed_tokens)
        table = torch.tensor(seq.block_table, dtype=torch.int64)
        stored = k_cache[table[pos // BLOCK], pos % BLOCK]  # [num_computed, 4]
        expect = torch.tensor(seq.token_ids[: seq.num_computed_tokens], dtype=stored.dtype)
        assert torch.equal(stored[:, 0], expect), f"seq {seq.seq_id}: K/V holds other tokens"
        assert torch.equal(stored[:, 1], pos.to(stored.dtype))


class Entry(NamedTuple):
    request_id: str
    index: int
    computed: int  # num_computed_tokens when scheduled
    num: int  # tokens scheduled this step
    uncomputed: int


class Snapshot(NamedTuple):
    """What one schedule() call returned, frozen before the step mutates anything."""

    scheduled: list[Entry]
    copies: list[tuple[int, int]]
    tables: dict[tuple[str, int], list[int]]  # block table of every live sequence
    refcounts: list[int]
    num_running: int


def spy(engine: LLMEngine) -> list[Snapshot]:
    """Record every schedule() output while the engine steps normally."""
    record: list[Snapshot] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        record.append(Snapshot(
            scheduled=[Entry(s.request_id, s.index, s.num_computed_tokens, n, s.num_uncomputed)
                       for s, n in out.scheduled.items()],
            copies=list(out.copies),
            tables={(s.request_id, s.index): list(s.block_table)
                    for seqs in engine.scheduler.requests.values() for s in seqs},
            refcounts=[engine.pool.refcount(b) for b in range(engine.pool.num_total)],
            num_running=len(engine.scheduler.running),
        ))
        return out

    engine.scheduler.schedule = recording_schedule
    return record


def run(engine: LLMEngine, on_step=None) -> dict[tuple[str, int], tuple[list[int], str]]:
    """Step until done; (request id, index) -> (tokens, finish reason). Checks that each
    completion ends exactly once and the pool stays consistent after every step."""
    tokens: dict[tuple[str, int], list[int]] = {}
    reasons: dict[tuple[str, int], str] = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            key = (out.request_id, out.index)
            assert key not in reasons, "output after the final one"
            tokens.setdefault(key, []).extend(out.new_token_ids)
            if out.finished:
                reasons[key] = out.finish_reason
        check_pool(engine)
        check_kv(engine)
        if on_step is not None:
            on_step(engine)
        steps += 1
        assert steps < 5000, "no progress"
    return {k: (tokens.get(k, []), reasons[k]) for k in reasons}


def random_requests(count: int, seed: int) -> list[tuple[str, list[int], int]]:
    rng = random.Random(seed)
    reqs = []
    for i in range(count):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(5, 40))]
        reqs.append((f"r{i}", prompt, rng.randint(5, 30)))
    return reqs


# -- tests ----------------------------------------------------------------------------
def test_mock_model_alone_matches_reference():
    engine = make_engine(num_kv_blocks=64)
    prompt = [3, 1, 4, 1, 5, 9, 2]
    engine.add_request("a", prompt, greedy(12))
    assert run(engine) == {("a", 0): (reference(prompt, 12), "length")}


def test_eos_stops_unless_ignored_and_frees_blocks():
    rng = random.Random(0)
    prompts = ([rng.randrange(1, VOCAB) for _ in range(36)] for _ in range(1000))
    prompt = next(p for p in prompts if EOS in reference(p, 12)[2:] and EOS not in reference(p, 2))
    expect = reference(prompt, 12)
    stop_at = expect.index(EOS, 2) + 1  # eos inside the output, after min_tokens=2
    engine = make_engine(num_kv_blocks=64)
    assert engine.eos_token_ids == (EOS,)
    engine.add_request("eos", prompt, SamplingParams(max_tokens=12, temperature=0.0, min_tokens=2))
    engine.add_request("ignore", prompt, greedy(12))
    results = run(engine)
    assert results[("eos", 0)] == (expect[:stop_at], "stop")
    assert results[("ignore", 0)] == (expect, "length")
    assert engine.pool.num_used == 0


def test_many_requests_on_tiny_pool_preempt_and_finish_correctly():
    # 18 blocks x 4 = 72 tokens: exactly one max_model_len sequence.
    engine = make_engine(num_kv_blocks=18, max_num_seqs=8, max_num_batched_tokens=32)
    reqs = random_requests(30, seed=1)
    for rid, prompt, n in reqs:
        engine.add_request(rid, prompt, greedy(n))
    results = run(engine)
    assert engine.scheduler.num_preemptions > 0
    assert results == {(rid, 0): (reference(prompt, n), "length") for rid, prompt, n in reqs}
    pool = engine.pool
    assert pool.num_used == 0 and not any(pool.refcount(b) for b in range(pool.num_total))
    assert pool.num_free == pool.num_total
    assert engine.scheduler.requests == {} and not engine.scheduler.running
    kv = engine.kv_usage()
    assert kv["used"] + kv["cached"] + kv["free"] == kv["total"] == 18


def test_preempted_sequences_keep_tokens_and_match_unpressured_run():
    reqs = random_requests(12, seed=7)
    outputs = {}
    for name, blocks in (("roomy", 400), ("tight", 18)):
        engine = make_engine(num_kv_blocks=blocks, max_num_seqs=6, max_num_batched_tokens=24)
        for rid, prompt, n in reqs:
            engine.add_request(rid, prompt, greedy(n))
        preempted_with_output = []

        def watch(engine):
            for seq in engine.scheduler.waiting:
                if seq.num_output_tokens > 0:
                    # a preempted sequence went back to the queue with its tokens and no blocks
                    assert seq.block_table == [] and seq.num_computed_tokens == 0
                    preempted_with_output.append(list(seq.output_token_ids))

        outputs[name] = run(engine, watch)
        if name == "roomy":
            assert engine.scheduler.num_preemptions == 0
        else:
            assert engine.scheduler.num_preemptions > 0
            assert preempted_with_output, "no sequence was preempted after it had generated"
            # what it had generated before preemption is a prefix of its final output
            finals = [toks for toks, _ in outputs[name].values()]
            for partial in preempted_with_output:
                assert any(f[: len(partial)] == partial for f in finals)
        assert engine.pool.num_used == 0
    assert outputs["tight"] == outputs["roomy"]
    assert outputs["roomy"] == {(rid, 0): (reference(p, n), "length") for rid, p, n in reqs}


def test_chunked_prefill_respects_budgets_and_decodes_go_first():
    budget, max_seqs = 6, 3
    engine = make_engine(num_kv_blocks=64, max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    prompts = {"short": [1, 2, 3], "long": list(range(5, 35)), "mid": list(range(10)), "late": [7] * 5}
    max_tokens = {"short": 20, "long": 3, "mid": 4, "late": 4}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, greedy(max_tokens[rid]))
    steps = spy(engine)
    results = run(engine)
    for step in steps:
        assert 0 < sum(e.num for e in step.scheduled) <= budget
        assert len(step.scheduled) <= max_seqs and step.num_running <= max_seqs
        kinds = ["decode" if e.uncomputed == 1 else "prefill" for e in step.scheduled]
        assert kinds == sorted(kinds), f"prefill before decode: {kinds}"  # 'decode' < 'prefill'
        assert all(1 <= e.num <= e.uncomputed for e in step.scheduled)
    assert max(len(st.scheduled) for st in steps) == max_seqs  # the limit was actually reached
    long_chunks = [(e.computed, e.num) for st in steps for e in st.scheduled
                   if e.request_id == "long" and e.computed < 30]
    assert len(long_chunks) >= 5, long_chunks  # 30 tokens, at most 6 a step
    starts = list(itertools.accumulate([n for _, n in long_chunks], initial=0))
    assert [c for c, _ in long_chunks] == starts[:-1] and starts[-1] == 30  # contiguous, exact
    assert results == {(rid, 0): (reference(prompts[rid], max_tokens[rid]), "length") for rid in prompts}


def test_schedule_output_orders_running_decodes_before_prefill_chunks():
    engine = make_engine(num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=8)
    steps = spy(engine)
    engine.add_request("big", list(range(20)), greedy(8))
    engine.step()  # big: first 8-token chunk
    engine.add_request("small", [1, 2], greedy(8))
    engine.step()  # big: next 8 tokens; budget exhausted, small waits
    engine.step()  # big: last 4 tokens + small admitted (2 tokens) -> both sample
    engine.step()  # both decode
    engine.add_request("third", list(range(30, 60)), greedy(2))  # no shared prefix with big
    for _ in range(3):
        engine.step()  # third: admitted, then a running prefill, still after the decodes
    got = [[(e.request_id, e.num) for e in st.scheduled] for st in steps]
    assert got == [
        [("big", 8)], [("big", 8)], [("big", 4), ("small", 2)], [("big", 1), ("small", 1)],
        [("big", 1), ("small", 1), ("third", 6)], [("big", 1), ("small", 1), ("third", 6)],
        [("big", 1), ("small", 1), ("third", 6)],
    ]


def test_abort_mid_prefill_and_mid_decode_frees_blocks():
    engine = make_engine(num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=8)
    keep_prompt = [9, 8, 7, 6, 5]
    engine.add_request("keep", keep_prompt, greedy(25))
    collected = {("keep", 0): []}

    def step():
        for out in engine.step():
            collected.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
            assert out.request_id == "keep" or not out.finished

    step()  # keep prefilled (5 tokens)
    keep_seq = engine.scheduler.requests["keep"][0]
    engine.add_request("pre", list(range(30)), greedy(5))
    step()  # keep decodes 1, pre gets a 7-token chunk
    pre_seq = engine.scheduler.requests["pre"][0]
    assert pre_seq.status is SequenceStatus.RUNNING
    assert 0 < pre_seq.num_computed_tokens < 30 and pre_seq.block_table
    final = engine.abort("pre")
    assert len(final) == 1
    assert (final[0].request_id, final[0].finished, final[0].finish_reason) == ("pre", True, "abort")
    assert final[0].new_token_ids == []
    assert pre_seq.block_table == [] and pre_seq.finish_reason == "abort"
    assert engine.pool.num_used == len(keep_seq.block_table)
    check_pool(engine)
    assert engine.abort("pre") == []  # second abort is a no-op

    engine.add_request("dec", [4, 4, 4, 4, 4, 4], greedy(20))
    for _ in range(5):
        step()
    dec_seq = engine.scheduler.requests["dec"][0]
    assert dec_seq.num_output_tokens >= 2 and dec_seq.num_uncomputed == 1
    before = len(collected[("dec", 0)])
    final = engine.abort("dec")
    assert [(o.request_id, o.finish_reason, o.finished) for o in final] == [("dec", "abort", True)]
    assert engine.pool.num_used == len(keep_seq.block_table)
    assert collected[("dec", 0)] == reference([4] * 6, before)
    check_pool(engine)

    # a waiting (never admitted) request can be aborted too
    engine.add_request("queued", [1, 2, 3], greedy(3))
    final = engine.abort("queued")
    assert [o.finish_reason for o in final] == ["abort"] and not engine.scheduler.waiting
    results = run(engine)
    collected[("keep", 0)].extend(results[("keep", 0)][0])
    assert results[("keep", 0)][1] == "length"
    assert collected[("keep", 0)] == reference(keep_prompt, 25)
    assert set(results) == {("keep", 0)}
    assert engine.pool.num_used == 0


def test_n_children_share_prompt_blocks_and_copy_partial_block_on_write():
    engine = make_engine(num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=64)
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks + a partial one
    engine.add_request("fork", prompt, greedy(6, n=3))
    steps = spy(engine)
    outs = engine.step()  # prefill; all three completions get their first token
    assert sorted(o.index for o in outs) == [0, 1, 2]
    seqs = engine.scheduler.requests["fork"]
    parent = seqs[0]
    assert len(parent.block_table) == 3
    for child in seqs[1:]:
        assert child.status is SequenceStatus.RUNNING
        assert child.block_table == parent.block_table
    assert [engine.pool.refcount(b) for b in parent.block_table] == [3, 3, 3]
    assert engine.pool.num_used == 3
    assert steps[0].copies == []
    shared = list(parent.block_table)

    engine.step()  # all three write position 10 into the shared partial block
    step = steps[1]
    assert sorted((e.index, e.num) for e in step.scheduled) == [(0, 1), (1, 1), (2, 1)]
    # two of the three copy the shared partial block; the last writer keeps it
    assert len(step.copies) == 2 and all(src == shared[2] for src, _ in step.copies)
    tables = [step.tables[("fork", i)] for i in range(3)]
    assert all(t[:2] == shared[:2] for t in tables)
    assert len({t[2] for t in tables}) == 3  # diverge at the partial block
    assert {dst for _, dst in step.copies} | {shared[2]} == {t[2] for t in tables}
    assert [step.refcounts[b] for b in shared[:2]] == [3, 3]
    assert all(step.refcounts[t[2]] == 1 for t in tables)
    check_pool(engine)
    check_kv(engine)

    results = run(engine)
    assert set(results) == {("fork", 0), ("fork", 1), ("fork", 2)}
    expect = reference(prompt, 6)
    for seq in seqs:  # greedy: all n completions equal the reference
        assert seq.output_token_ids == expect and seq.finish_reason == "length"
    assert engine.pool.num_used == 0


def test_n_children_fork_after_chunked_prefill_under_pressure():
    # chunked parent prompt, then three children decoding on a pool too small for all
    engine = make_engine(num_kv_blocks=18, max_num_seqs=8, max_num_batched_tokens=8)
    prompt = [5] * 3 + list(range(20, 42))  # 25 tokens
    engine.add_request("fork", prompt, greedy(30, n=3))
    engine.add_request("other", list(range(13)), greedy(20))
    results = run(engine)
    expect = reference(prompt, 30)
    assert results == {
        ("fork", 0): (expect, "length"), ("fork", 1): (expect, "length"),
        ("fork", 2): (expect, "length"), ("other", 0): (reference(list(range(13)), 20), "length"),
    }
    assert engine.scheduler.num_preemptions > 0
    assert engine.pool.num_used == 0


def test_sampled_n_children_diverge_keep_own_kv_and_survive_preemption():
    # seeded sampling makes the children write different tokens into the shared partial
    # block: without copy-on-write one child's K/V would hold a sibling's token (check_kv)
    prompt = list(range(30, 45))  # 15 tokens: 3 full blocks + a partial one
    params = SamplingParams(n=3, max_tokens=25, temperature=5.0, seed=1234, ignore_eos=True)
    results = {}
    for name, blocks in (("roomy", 200), ("tight", 18)):
        engine = make_engine(num_kv_blocks=blocks, max_num_seqs=8, max_num_batched_tokens=8)
        engine.add_request("fork", prompt, params)
        engine.add_request("other", list(range(20)), greedy(25))
        results[name] = run(engine)
        assert (engine.scheduler.num_preemptions > 0) == (name == "tight")
        assert engine.pool.num_used == 0
    outs = [results["roomy"][("fork", i)][0] for i in range(3)]
    assert len({tuple(o) for o in outs}) == 3, "children did not diverge"
    assert results["roomy"][("other", 0)] == (reference(list(range(20)), 25), "length")
    # a seeded sequence samples from its own generator: same tokens under preemption
    assert results["tight"] == results["roomy"]


@pytest.mark.parametrize("prompt_len", [13, 12])
def test_prefix_cache_hit_reports_cached_tokens_and_same_output(prompt_len):
    engine = make_engine(num_kv_blocks=64)
    prompt = [(7 * i + 3) % VOCAB for i in range(prompt_len)]
    steps = spy(engine)
    outputs = {}
    for rid in ("first", "second"):
        engine.add_request(rid, prompt, greedy(8))
        outputs[rid] = []
        while engine.has_unfinished():
            outputs[rid].extend(engine.step())
    full = (prompt_len - 1) // BLOCK * BLOCK  # 12 for 13 tokens; 8 for 12 (leave one token)
    assert [(e.computed, e.num) for e in steps[0].scheduled] == [(0, prompt_len)]
    admitted = next(st for st in steps if st.scheduled[0].request_id == "second")
    assert [(e.computed, e.num) for e in admitted.scheduled] == [(full, prompt_len - full)]
    assert all(o.num_cached_tokens == 0 for o in outputs["first"])
    assert all(o.num_cached_tokens == full for o in outputs["second"])
    tokens = {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in outputs.items()}
    assert tokens["first"] == tokens["second"] == reference(prompt, 8)
    assert engine.pool.num_used == 0 and engine.pool.num_cached > 0


def test_prefix_cache_disabled_reports_no_cached_tokens():
    engine = make_engine(num_kv_blocks=64, prefix_caching=False)
    prompt = list(range(13))
    results = []
    for rid in ("a", "b"):
        engine.add_request(rid, prompt, greedy(4))
        while engine.has_unfinished():
            results.extend(engine.step())
    assert all(o.num_cached_tokens == 0 for o in results)
    assert engine.pool.num_cached == 0


def test_concurrent_identical_prompts_share_cached_prefix():
    # the second request arrives after the first one's prompt is computed, while it still runs
    engine = make_engine(num_kv_blocks=64)
    prompt = list(range(2, 19))  # 17 tokens: 4 full blocks
    engine.add_request("a", prompt, greedy(10))
    engine.step()
    engine.add_request("b", prompt, greedy(10))
    engine.step()
    a, b = engine.scheduler.requests["a"][0], engine.scheduler.requests["b"][0]
    assert b.num_cached_tokens == 16
    assert a.block_table[:4] == b.block_table[:4]
    assert all(engine.pool.refcount(x) == 2 for x in a.block_table[:4])
    run(engine)
    assert a.output_token_ids == b.output_token_ids == reference(prompt, 10)
    assert engine.pool.num_used == 0


def test_abort_n_request_before_fork_finishes_all_completions():
    engine = make_engine(num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=4)
    engine.add_request("fork", list(range(11)), greedy(5, n=3))
    engine.step()  # first 4-token chunk; children still wait for the prompt
    seqs = engine.scheduler.requests["fork"]
    assert [s.status for s in seqs[1:]] == [SequenceStatus.FORK_PENDING] * 2
    assert engine.pool.num_used == 1
    final = engine.abort("fork")
    assert sorted((o.index, o.finish_reason, o.finished) for o in final) == [
        (0, "abort", True), (1, "abort", True), (2, "abort", True)]
    assert all(s.is_finished and s.block_table == [] for s in seqs)
    assert engine.pool.num_used == 0 and not engine.has_unfinished()
    assert engine.scheduler.requests == {}


def test_generation_stops_at_max_model_len():
    engine = make_engine(num_kv_blocks=4, max_model_len=16)  # pool = one 16-token sequence
    prompt = list(range(10))
    engine.add_request("a", prompt, SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True))
    engine.add_request("b", prompt[:6], greedy(30))
    results = run(engine)
    assert results[("a", 0)] == (reference(prompt, 6), "length")
    assert results[("b", 0)] == (reference(prompt[:6], 10), "length")
    assert engine.pool.num_used == 0


def test_n_above_max_num_seqs_is_refused_instead_of_waiting_forever():
    engine = make_engine(num_kv_blocks=64, max_num_seqs=2)
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine.add_request("wide", [1, 2, 3], greedy(3, n=3))
    assert not engine.has_unfinished() and engine.scheduler.requests == {}
    engine.add_request("ok", [1, 2, 3], greedy(3, n=2))  # n == max_num_seqs is fine
    results = run(engine)
    assert results == {("ok", i): (reference([1, 2, 3], 3), "length") for i in range(2)}


def random_workload(engine: LLMEngine, rng: random.Random, max_model_len: int):
    """(arrival step, request id, prompt, params) with shared prefixes, n up to 3, greedy
    or seeded sampling."""
    shared = [rng.randrange(VOCAB) for _ in range(max_model_len)]
    work = []
    for i in range(rng.randint(2, 8)):
        plen = rng.randint(1, max_model_len - 1)
        prompt = shared[:plen] if rng.random() < 0.5 else [rng.randrange(VOCAB) for _ in range(plen)]
        n = rng.randint(1, min(3, engine.config.max_num_seqs))
        temperature = 0.0 if rng.random() < 0.6 else 3.0
        params = SamplingParams(n=n, max_tokens=rng.randint(1, 20), temperature=temperature,
                                seed=rng.randrange(1000), ignore_eos=True)
        work.append((rng.randint(0, 12), f"r{i}", prompt, params))
    return work


@pytest.mark.parametrize("seed", range(24))
def test_random_workloads_keep_pool_and_kv_consistent(seed):
    """Random arrivals, aborts, n > 1, chunking and preemption on tiny pools: the pool
    accounting and every sequence's K/V hold after each step; greedy output is exact."""
    rng = random.Random(seed)
    mml = rng.choice([16, 24, 40])
    engine = make_engine(
        num_kv_blocks=-(-mml // BLOCK) + rng.choice([0, 1, 3, 10]), max_num_seqs=rng.randint(1, 6),
        max_num_batched_tokens=rng.randint(1, 20), max_model_len=mml,
        prefix_caching=rng.random() < 0.8,
    )
    pending = random_workload(engine, rng, mml)
    requests = {rid: (prompt, params) for _, rid, prompt, params in pending}
    tokens, reasons = {}, {}
    step = 0
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
    for rid, (prompt, params) in requests.items():
        for i in range(params.n):
            reason = reasons[(rid, i)]
            if reason == "abort":
                continue
            assert reason == "length"
            got = tokens[(rid, i)]
            assert len(got) == min(params.max_tokens, mml - len(prompt))
            if params.temperature == 0.0:
                assert got == reference(prompt, len(got))
