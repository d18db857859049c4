"""Encoder-decoder generation (BART; T5 v1.0 and v1.1): greedy parity with transformers'
`generate` alone, in a batch with other requests and under preemption; cross-attention blocks
in the pool, returned at finish, abort and preemption; what such a model refuses."""
from __future__ import annotations

import pytest
import torch

from model.sampling import SamplingParams
from server.engine import LLM
from server.engine.limits import ContextLengthError, RequestError
from tests.checkpoints import VOCAB
from tests.encdec_checkpoints import load_bart_reference, reference_seq2seq_greedy

MAX_NEW = 16
PROMPT_LENS = (6, 11, 3, 25, 17)
BLOCK = 4  # small blocks: encoder inputs and outputs span several
MAX_LEN = 128  # max_model_len: the decoder's context and the longest encoder input
KINDS = ["bart", "t5-v1.0", "t5-v1.1"]


def make_case(path):
    """(checkpoint, prompts, [(reference tokens, reference logprobs)])."""
    ref = load_bart_reference(path)
    gen = torch.Generator().manual_seed(5)
    prompts = [[0] + torch.randint(4, VOCAB, (n - 2,), generator=gen).tolist() + [2] for n in PROMPT_LENS]
    return path, prompts, [reference_seq2seq_greedy(ref, p, MAX_NEW) for p in prompts]


@pytest.fixture(scope="module", params=KINDS)
def case(request, encdec_checkpoint):
    return make_case(encdec_checkpoint(request.param))


@pytest.fixture(scope="module")
def bart_case(bart_checkpoint):
    return make_case(bart_checkpoint)


# min_tokens as transformers' min_new_tokens: EOS is masked until MAX_NEW tokens are out
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, logprobs=0)


def assert_matches(outputs, expected):
    for out, (tokens, logprobs) in zip(outputs, expected):
        assert out.token_ids == tokens
        ours = [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, logprobs)) < 1e-4


def holders(engine):
    """Every block reference the running sequences hold (decoder and cross blocks)."""
    seqs = engine.scheduler.running
    return [s.block_table for s in seqs] + [s.cross_blocks for s in seqs]


def test_greedy_alone(case):
    path, prompts, expected = case
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=BLOCK, max_model_len=MAX_LEN)
    for prompt, exp in zip(prompts, expected):
        assert_matches(llm.generate([prompt], GREEDY), [exp])
    assert llm.engine.pool.num_used == 0


def test_greedy_alone_torch_kernels(bart_case):
    path, prompts, expected = bart_case
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=BLOCK, kernel_backend="torch")
    for prompt, exp in zip(prompts, expected):
        assert_matches(llm.generate([prompt], GREEDY), [exp])
    assert llm.engine.pool.num_used == 0


def test_greedy_in_a_batch_with_other_requests(case):
    """The parity prompts batched together and with sampled, n=2 and early-stopping requests
    admitted between them (several encoders padded into one batch)."""
    path, prompts, expected = case
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=BLOCK, max_model_len=MAX_LEN)
    others = [SamplingParams(temperature=1.0, seed=3, max_tokens=5), SamplingParams(temperature=0.7, n=2, seed=1,
              max_tokens=MAX_NEW + 3), SamplingParams(temperature=0, max_tokens=2)]
    batch = [p for pair in zip(prompts, [prompts[1], prompts[0], prompts[3]] + [prompts[2]] * 2) for p in pair]
    params = [q for pair in zip([GREEDY] * len(prompts), others + others[:2]) for q in pair]
    outs = llm.generate(batch, params)
    assert_matches(outs[::2], expected)
    assert [len(c.token_ids) for c in outs[3].outputs] == [MAX_NEW + 3] * 2
    assert llm.engine.pool.num_used == 0


def test_greedy_with_preemption_and_chunks(case):
    """A pool that holds one longest request (32 decoder + 32 cross blocks): the batch preempts
    and recomputes (encoder included); a small token budget chunks the recomputed decoder."""
    path, prompts, expected = case
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=BLOCK, num_kv_blocks=64,
              max_num_batched_tokens=40, max_model_len=MAX_LEN)
    assert_matches(llm.generate(prompts * 3, GREEDY), expected * 3)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.pool.num_used == 0
    llm.engine.pool.check_invariants([])


def test_cross_blocks_return_to_the_pool(bart_case):
    """Cross blocks are allocated at admission (one per BLOCK encoder tokens, written once),
    counted as used, and freed at finish, abort and preemption; invariants hold throughout."""
    path, prompts, _ = bart_case
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=BLOCK, num_kv_blocks=64)
    engine, pool = llm.engine, llm.engine.pool
    long = prompts[3]  # 25 tokens: 7 cross blocks
    engine.add_request("a", long, GREEDY)
    engine.add_request("b", prompts[0], GREEDY)
    engine.step()
    a, b = (engine.scheduler.requests[r][0] for r in "ab")
    assert len(a.cross_blocks) == -(-len(long) // BLOCK) and len(b.cross_blocks) == 2
    assert pool.num_used == len(a.cross_blocks) + len(b.cross_blocks) + len(a.block_table) + len(b.block_table)
    assert not set(a.cross_blocks) & set(a.block_table)
    pool.check_invariants(holders(engine))
    engine.abort("b")  # abort: b's decoder and cross blocks go back
    pool.check_invariants(holders(engine))
    assert pool.num_used == len(a.cross_blocks) + len(a.block_table)
    cross_before = list(a.cross_blocks)
    engine.scheduler._preempt(a)  # preemption: everything goes back; readmission encodes again
    assert a.cross_blocks == [] and pool.num_used == 0
    pool.check_invariants([])
    engine.step()
    assert len(a.cross_blocks) == len(cross_before)
    pool.check_invariants(holders(engine))
    while engine.has_unfinished():  # finish
        engine.step()
    assert pool.num_used == 0
    pool.check_invariants([])


def test_text_prompt_and_natural_stop(bart_case):
    """A text prompt is the encoder's input with the tokenizer's <s> ... </s>; without
    min_tokens the output may end at EOS, as transformers' does."""
    path, _, _ = bart_case
    import transformers as tf

    hf_tok = tf.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    llm = LLM(str(path), dtype="float32", device="cpu")
    text = "The quick brown fox"
    ids = hf_tok(text)["input_ids"]
    assert llm.tokenizer.encode(text) == ids and ids[0] == 0 and ids[-1] == 2
    ref_tokens, _ = reference_seq2seq_greedy(load_bart_reference(path), ids, MAX_NEW, min_new=0)
    out = llm.generate([text], SamplingParams(temperature=0, max_tokens=MAX_NEW))[0]
    assert out.token_ids == ref_tokens
    assert out.prompt_token_ids == ids


def test_refusals(bart_case):
    path, prompts, _ = bart_case
    llm = LLM(str(path), dtype="float32", device="cpu")
    engine = llm.engine
    with pytest.raises(ContextLengthError, match="encoder takes at most 128"):
        engine.add_request("long", [5] * 129, GREEDY)
    with pytest.raises(RequestError, match="prompt_logprobs"):
        engine.add_request("pl", prompts[0], SamplingParams(max_tokens=2, prompt_logprobs=1))
    with pytest.raises(RequestError, match="sessions"):
        engine.add_request("s", prompts[0], SamplingParams(max_tokens=2), session_id="x")
    assert not engine.has_unfinished() and engine.pool.num_used == 0


def test_seq2seq_bench_runs(bart_checkpoint, capsys):
    """The benchmark command end to end on the tiny checkpoint (a smoke run, nothing timed)."""
    from loadtest.seq2seq_bench import main

    path = bart_checkpoint
    assert main(["--model", str(path), "--input-len", "5", "--output-len", "2", "--streams", "2", "--rounds", "1",
                 "--batch1-requests", "1"]) == 0
    out = capsys.readouterr().out
    assert "| workmem | 2 streams |" in out and "workmem / transformers, 1 stream:" in out
