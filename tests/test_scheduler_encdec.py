"""Scheduler + engine with encoder-decoder requests, on a mock model that reads both its
decoder context and its encoder input back from the paged pool: a wrong cross block, one
freed too early or written twice, changes the tokens. Random workloads (arrivals, aborts,
n > 1 forks sharing cross blocks, chunking, preemption that re-encodes) keep the pool's
invariants after every step, with every decoder and cross reference accounted for.

The mock's encoder writes (id, position, 1, 2) per encoder token into the cross slots; the
decoder predicts
    next = (decoder context sum + decoder length + encoder sum + encoder length) % VOCAB
with sums of id * (position + 1), so `reference()` computes it in plain Python.
"""
from __future__ import annotations

import random

import pytest
import torch

from model.attention import gather_blocks
from model.config import EncoderSpec
from model.encdec import write_cross_kv
from model.loader import LoadedModel
from model.sampling import SamplingParams
from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from tests.test_scheduler import BLOCK, VOCAB, ContextSumModel, make_loaded

START = 5  # decoder_start_token_id
ENCODER_MAX = 12


class CrossSumModel(ContextSumModel):
    is_encoder_decoder = True

    def encode(self, batch, kv_cache) -> None:
        valid = batch.valid()  # [B, L]
        positions = torch.arange(valid.shape[1]).expand_as(valid)[valid].float()
        ids = batch.input_ids[valid].float()
        kv = torch.stack([ids, positions, torch.ones_like(ids), 2 * torch.ones_like(ids)], -1)[:, None, :]
        write_cross_kv(kv, kv, kv_cache[0], batch)

    def forward(self, input_ids, positions, kv_cache, meta):
        hidden = super().forward(input_ids, positions, kv_cache, meta)  # [T, 4]: decoder sum, length
        k_cache = kv_cache[0][0]
        for g in meta.cross.groups:
            keys = gather_blocks(k_cache, g.block_tables)[:, 0]  # [B, L, 4]
            mask = g.mask[:, 0] & g.valid[:, :, None]  # [B, max_q, L]
            slot = torch.arange(keys.shape[1], dtype=keys.dtype)
            written = (keys[..., 1] == slot) & (keys[..., 3] == 2)
            assert bool((written[:, None, :] | ~mask).all()), "a visible cross key was never written"
            total = (mask.float() * (keys[..., 0] * (keys[..., 1] + 1))[:, None, :]).sum(-1) + mask.float().sum(-1)
            hidden[g.out_rows, 2] = total.reshape(-1)[g.flat_index]
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        target = (hidden[:, 0] + hidden[:, 1] + hidden[:, 2]).long() % VOCAB
        return torch.nn.functional.one_hot(target, VOCAB).float() * 10.0


def reference(encoder_prompt: list[int], num: int) -> list[int]:
    extra = sum(t * (i + 1) for i, t in enumerate(encoder_prompt)) + len(encoder_prompt)
    tokens, total = [START], START
    for _ in range(num):
        nxt = (total + len(tokens) + extra) % VOCAB
        total += nxt * (len(tokens) + 1)
        tokens.append(nxt)
    return tokens[1:]


def make_engine(num_kv_blocks: int, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                prefix_caching: bool) -> LLMEngine:
    base = make_loaded()
    spec = EncoderSpec(num_layers=1, num_heads=1, intermediate_size=4, max_position_embeddings=ENCODER_MAX,
                       decoder_start_token_id=START, pad_token_id=0, scale_embedding=False)
    config = base.config.__class__(**{**base.config.__dict__, "encoder": spec})
    return LLMEngine(
        EngineConfig(model="mock", dtype="float32", device="cpu", block_size=BLOCK, num_kv_blocks=num_kv_blocks,
                     max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                     max_model_len=max_model_len, enable_prefix_caching=prefix_caching),
        loaded=LoadedModel(CrossSumModel(), config, base.tokenizer),
    )


def check_pool(engine: LLMEngine) -> None:
    seqs = [s for group in engine.scheduler.requests.values() for s in group]
    engine.pool.check_invariants([s.block_table for s in seqs] + [s.cross_blocks for s in seqs])


def check_cross_kv(engine: LLMEngine) -> None:
    """Every running sequence's cross blocks hold its encoder input, in order."""
    k_cache = engine.runner.kv_cache[0, 0, :, :, 0]  # [num_blocks, block_size, 4]
    for seq in engine.scheduler.running:
        pos = torch.arange(len(seq.encoder_prompt))
        table = torch.tensor(seq.cross_blocks, dtype=torch.int64)
        stored = k_cache[table[pos // BLOCK], pos % BLOCK]
        assert stored[:, 0].tolist() == [float(t) for t in seq.encoder_prompt]
        assert bool((stored[:, 3] == 2).all())


def test_alone_and_batched_match_reference():
    engine = make_engine(64, 8, 64, 40, True)
    prompts = [[1, 2, 3], [7] * ENCODER_MAX, [9, 4]]
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    outs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(out.request_id, []).extend(out.new_token_ids)
        check_pool(engine)
        check_cross_kv(engine)
    assert outs == {f"r{i}": reference(p, 10) for i, p in enumerate(prompts)}
    assert engine.pool.num_used == 0


@pytest.mark.parametrize("seed", range(16))
def test_random_workloads_keep_pool_and_cross_kv_consistent(seed):
    rng = random.Random(seed)
    mml = rng.choice([12, 24])
    needed = -(-mml // BLOCK) + -(-ENCODER_MAX // BLOCK)  # one longest request: decoder + cross blocks
    engine = make_engine(needed + rng.choice([0, 2, 8]), rng.randint(1, 6), rng.randint(1, 24), mml,
                         rng.random() < 0.8)
    shared = [rng.randrange(VOCAB) for _ in range(ENCODER_MAX)]
    pending = []
    for i in range(rng.randint(2, 8)):
        plen = rng.randint(1, ENCODER_MAX)
        prompt = shared[:plen] if rng.random() < 0.5 else [rng.randrange(VOCAB) for _ in range(plen)]
        params = SamplingParams(n=rng.randint(1, min(3, engine.config.max_num_seqs)), max_tokens=rng.randint(1, mml - 1),
                                temperature=0.0 if rng.random() < 0.6 else 3.0, seed=rng.randrange(1000),
                                ignore_eos=True)
        pending.append((rng.randint(0, 10), f"r{i}", prompt, params))
    requests = {rid: (prompt, params) for _, rid, prompt, params in pending}
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
            tokens.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
            if out.finished:
                reasons[(out.request_id, out.index)] = out.finish_reason
        check_pool(engine)
        check_cross_kv(engine)
        step += 1
        assert step < 2000, "no progress"
    assert engine.pool.num_used == 0 and engine.scheduler.requests == {}
    for rid, (prompt, params) in requests.items():
        for i in range(params.n):
            if reasons[(rid, i)] == "abort":
                continue
            got = tokens[(rid, i)]
            assert reasons[(rid, i)] == "length" and len(got) == params.max_tokens
            if params.temperature == 0.0:
                assert got == reference(prompt, len(got))
