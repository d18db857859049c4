"""Sampler and SamplingParams against plain Python reference implementations."""
from __future__ import annotations

import math
import random
import warnings

import pytest
import torch

from model.sampling import (
    MAX_LOGPROBS,
    Sampler,
    SamplingParams,
    SamplingRow,
    _min_p,
    _top_k_top_p,
    make_generator,
    process_logits,
)

NEG_INF = float("-inf")
CHI2_DF4_P001 = 18.47  # chi-square critical value, 4 degrees of freedom, p = 0.001


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def row(prompt=(), output=(), eos=(), generator=None, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prompt), list(output), generator, list(eos))


# ---------------------------------------------------------------- references (plain loops)

def ref_softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(v - m) for v in xs]
    s = sum(e)
    return [v / s for v in e]


def ref_top_k(xs: list[float], k: int) -> set[int]:
    if k <= 0 or k >= len(xs):
        return set(range(len(xs)))
    kth = sorted(xs, reverse=True)[k - 1]
    return {i for i, v in enumerate(xs) if v >= kth}


def ref_top_p(xs: list[float], p: float) -> set[int]:
    """Smallest most-probable set whose mass reaches p (at least one token)."""
    if p >= 1.0:
        return set(range(len(xs)))
    probs = ref_softmax(xs)
    kept, mass = set(), 0.0
    for i in sorted(range(len(xs)), key=lambda i: -probs[i]):
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


def ref_min_p(xs: list[float], min_p: float) -> set[int]:
    probs = ref_softmax(xs)
    return {i for i, q in enumerate(probs) if q >= min_p * max(probs)}


def ref_process(xs: list[float], r: SamplingRow) -> list[float]:
    """logit_bias, min_tokens, repetition / presence / frequency penalties, one token at a time."""
    p, x = r.params, list(xs)
    for tok, bias in (p.logit_bias or {}).items():
        x[tok] += bias
    if len(r.output_token_ids) < p.min_tokens:
        for tok in list(p.stop_token_ids) + ([] if p.ignore_eos else list(r.eos_token_ids)):
            x[tok] = NEG_INF
    seen = set(r.prompt_token_ids) | set(r.output_token_ids)
    for tok in range(len(x)):
        if tok in seen:
            x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
        count = list(r.output_token_ids).count(tok)
        x[tok] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return x


def ref_argmax(xs: list[float]) -> int:
    best = 0
    for i, v in enumerate(xs):
        if v > xs[best]:
            best = i
    return best


def ref_log_softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    lse = m + math.log(sum(math.exp(v - m) for v in xs))
    return [v - lse for v in xs]


def chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * q) ** 2 / (n * q) for c, q in zip(counts, probs))


def kept_of(masked: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(masked.tolist()) if v != NEG_INF}


# ---------------------------------------------------------------- SamplingParams validation

@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 1.5), ("n", True),
    ("max_tokens", -1), ("max_tokens", 1.5),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", float("nan")), ("top_p", -0.5),
    ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", float("nan")),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", float("inf")),
    ("presence_penalty", 2.5), ("presence_penalty", float("nan")), ("frequency_penalty", -2.01),
    ("frequency_penalty", float("-inf")),
    ("min_tokens", -1), ("min_tokens", 17),  # default max_tokens is 16
    ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1), ("prompt_logprobs", -1), ("prompt_logprobs", MAX_LOGPROBS + 1),
    ("logit_bias", {5: 101.0}), ("logit_bias", {5: float("nan")}), ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"abc": 1.0}), ("logit_bias", [1, 2]),
    ("stop", [""]), ("stop", [3]), ("stop", 7),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]),
    ("seed", 2**64), ("seed", "7"),
    ("ignore_eos", 1), ("skip_special_tokens", None),
])
def test_invalid_params_raise_naming_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**{field: value})


def test_valid_params_are_normalised():
    p = SamplingParams(stop="###", logit_bias={"12": 3, 4: -100}, top_k=-1, temperature=0,
                       max_tokens=None, min_tokens=50, logprobs=MAX_LOGPROBS, seed=2**64 - 1)
    assert p.stop == ["###"]
    assert p.logit_bias == {12: 3.0, 4: -100.0} and all(type(k) is int for k in p.logit_bias)
    assert type(p.temperature) is float and p.greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert SamplingParams(min_tokens=5, max_tokens=5).min_tokens == 5


def test_check_vocab():
    SamplingParams(logit_bias={9: 1.0}, stop_token_ids=[9]).check_vocab(10)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={10: 1.0}).check_vocab(10)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[3, 12]).check_vocab(10)


# ---------------------------------------------------------------- masks vs references

def _random_cases(seed: int, count: int, vocab: int):
    rng = random.Random(seed)
    for _ in range(count):
        xs = [rng.gauss(0, 2) for _ in range(vocab)]
        yield rng, xs


def _far_from_boundaries(xs: list[float], top_p: float, min_p: float) -> bool:
    """Skip cases where float32 vs float64 rounding could flip a token across a threshold."""
    probs = sorted(ref_softmax(xs), reverse=True)
    cums = [sum(probs[:i + 1]) for i in range(len(probs))]
    return (all(abs(c - top_p) > 1e-4 for c in cums)
            and all(abs(q / probs[0] - min_p) > 1e-4 for q in probs))


def test_top_k_top_p_match_reference():
    vocab, checked = 12, 0
    for rng, xs in _random_cases(0, 300, vocab):
        k = rng.choice([0, -1, 1, 2, 5, 11, 12, 50])
        p = rng.choice([1.0, 0.99, 0.9, 0.5, 0.2, 1e-3])
        if not _far_from_boundaries(xs, p, 0.0):
            continue
        after_k = ref_top_k(xs, k)
        expected = after_k & ref_top_p([v if i in after_k else NEG_INF for i, v in enumerate(xs)], p)
        # each case is batched with an unrestricted row, so per-row parameters must not leak
        out = _top_k_top_p(torch.tensor([xs, xs]), [row(top_k=k, top_p=p), row()])
        assert kept_of(out[0]) == expected, (k, p)
        assert kept_of(out[1]) == set(range(vocab))
        checked += 1
    assert checked > 200


def test_top_k_only_path_matches_reference_and_keeps_ties():
    vocab = 10
    for rng, xs in _random_cases(1, 100, vocab):
        ks = [rng.choice([0, 1, 3, 9, 10]) for _ in range(3)]
        out = _top_k_top_p(torch.tensor([xs] * 3), [row(top_k=k) for k in ks])
        for j, k in enumerate(ks):
            assert kept_of(out[j]) == ref_top_k(xs, k)
    tied = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert kept_of(_top_k_top_p(tied, [row(top_k=1)])[0]) == {1, 2}
    assert kept_of(_top_k_top_p(tied, [row(top_k=1, top_p=0.99)])[0]) == {1, 2}


def test_top_p_keeps_at_least_one_token():
    xs = [10.0, 0.0, -1.0, -2.0]
    out = _top_k_top_p(torch.tensor([xs]), [row(top_p=1e-6)])
    assert kept_of(out[0]) == {0}


def test_min_p_matches_reference():
    vocab, checked = 16, 0
    for rng, xs in _random_cases(2, 200, vocab):
        m = rng.choice([0.0, 0.01, 0.1, 0.3, 0.8, 1.0])
        if m < 1.0 and not _far_from_boundaries(xs, 2.0, m):
            continue
        probs = torch.tensor([xs, xs]).softmax(-1)
        out = _min_p(probs, [row(min_p=m), row()])
        assert {i for i, q in enumerate(out[0].tolist()) if q > 0} == ref_min_p(xs, m)
        assert torch.equal(out[1], probs[1])
        checked += 1
    assert checked > 100


# ---------------------------------------------------------------- bias, min_tokens, penalties

def _processing_rows(rng: random.Random, vocab: int) -> list[SamplingRow]:
    rows = []
    for _ in range(6):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        params = dict(
            repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.7]),
            presence_penalty=rng.choice([0.0, 0.5, -1.0]),
            frequency_penalty=rng.choice([0.0, 0.4, -0.3]),
            logit_bias=rng.choice([None, {rng.randrange(vocab): rng.uniform(-100, 100), 3: 5.0}]),
            min_tokens=rng.choice([0, 3, 9]), max_tokens=20,
            stop_token_ids=rng.choice([[], [rng.randrange(vocab)]]),
            ignore_eos=rng.random() < 0.3,
        )
        rows.append(row(prompt, output, eos=[0], **params))
    return rows


def test_process_logits_matches_reference():
    vocab, rng = 20, random.Random(3)
    for _ in range(30):
        rows = _processing_rows(rng, vocab)
        logits = randn(len(rows), vocab, seed=rng.randrange(99)) * 3
        before = logits.clone()
        got = process_logits(logits, rows)
        expected = torch.tensor([ref_process(xs, r) for xs, r in zip(logits.tolist(), rows)])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(logits, before)


def test_rows_without_processing_are_untouched():
    logits = randn(3, 8, seed=5)
    rows = [row([1, 2], [1]), row([1], [1, 1], repetition_penalty=2.0, presence_penalty=1.0), row([], [2])]
    out = process_logits(logits, rows)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert not torch.equal(out[1], logits[1])


def test_repetition_penalty_sign_rule():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    out = process_logits(logits, [row([0], [1], repetition_penalty=2.0)])
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_presence_and_frequency_count_output_only():
    logits = torch.zeros(1, 4)
    out = process_logits(logits, [row([0, 0, 0], [1, 1, 1, 2], presence_penalty=0.5, frequency_penalty=0.25)])
    assert out.tolist() == [[0.0, -1.25, -0.75, 0.0]]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[5.0, 1.0, 4.0, 0.0]] * 4)  # eos = 0 is the argmax, stop id 2 next
    rows = [
        row(output=[3], eos=[0], temperature=0, min_tokens=2, stop_token_ids=[2]),
        row(output=[3, 3], eos=[0], temperature=0, min_tokens=2, stop_token_ids=[2]),
        row(output=[3], eos=[0], temperature=0, min_tokens=2, stop_token_ids=[2], ignore_eos=True),
        row(output=[3], eos=[0], temperature=0.5, min_tokens=2, stop_token_ids=[2], seed=1,
            generator=make_generator(1, "cpu")),
    ]
    out = Sampler(0)(logits, rows).token_ids
    assert out[:3] == [1, 0, 0]   # masked; reached; ignore_eos leaves eos alone, stop id masked
    assert out[3] not in (0, 2)


def test_logit_bias_and_out_of_vocab_ids():
    logits = torch.tensor([[3.0, 0.0, 0.0]])
    out = Sampler(0)(logits, [row(temperature=0, logit_bias={2: 3.5, 99: 100.0})])
    assert out.token_ids == [2]


# ---------------------------------------------------------------- greedy and logprobs

def test_greedy_equals_argmax_with_ties_and_processing():
    rng, vocab = random.Random(4), 20
    changed = 0
    for _ in range(20):
        rows = _processing_rows(rng, vocab)
        for r in rows[::2]:
            r.params.temperature = 0.0
        logits = randn(len(rows), vocab, seed=rng.randrange(99)) * 3
        logits[:, 7] = logits[:, 13] = logits.max() + 1  # a tie, broken by the first index
        out = Sampler(0)(logits, rows).token_ids
        for j, (xs, r) in enumerate(zip(logits.tolist(), rows)):
            if r.params.greedy:
                assert out[j] == ref_argmax(ref_process(xs, r))
                changed += out[j] != 7
    assert changed > 0  # penalties / bias really moved some argmax


def test_all_greedy_batch_breaks_ties_by_first_index():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0], [1.0, 0.0, 0.0, 3.0]])
    assert Sampler(0)(logits, [row(temperature=0) for _ in range(3)]).token_ids == [1, 0, 3]
    mixed = [row(temperature=0), row(temperature=0), row(top_k=1)]
    assert Sampler(0)(logits, mixed).token_ids == [1, 0, 3]


def test_logprobs_are_raw_log_softmax_and_include_sampled():
    logits = randn(4, 30, seed=6) * 2
    low = int(logits[0].argmin())
    rows = [
        row(temperature=0, logprobs=2, logit_bias={low: 100.0}),    # sampled is not in the top-2
        row(temperature=0.3, logprobs=5, repetition_penalty=1.5, output=[1, 2]),
        row(logprobs=0),
        row(),
    ]
    out = Sampler(0)(logits, rows)
    ref = [ref_log_softmax(xs) for xs in logits.tolist()]
    assert out.token_ids[0] == low
    for j, k in ((0, 2), (1, 5), (2, 0)):
        top = sorted(range(30), key=lambda t: -ref[j][t])[:k]
        assert set(out.logprobs[j]) == set(top) | {out.token_ids[j]}
        for tok, lp in out.logprobs[j].items():
            assert lp == pytest.approx(ref[j][tok], abs=1e-5)
    assert len(out.logprobs[0]) == 3 and len(out.logprobs[2]) == 1
    assert out.logprobs[3] is None


def test_logprobs_clamped_to_vocab_and_low_precision_logits():
    logits = randn(2, 5, seed=7).to(torch.bfloat16)
    out = Sampler(0)(logits, [row(temperature=0, logprobs=MAX_LOGPROBS), row(temperature=0)])
    assert len(out.logprobs[0]) == 5
    ref = ref_log_softmax(logits.float()[0].tolist())
    assert all(lp == pytest.approx(ref[t], abs=1e-5) for t, lp in out.logprobs[0].items())
    assert out.token_ids == logits.float().argmax(-1).tolist()


def test_caller_logits_unchanged_and_bad_shapes_rejected():
    logits = randn(2, 6, seed=8)
    before = logits.clone()
    Sampler(0)(logits, [row(temperature=0, logit_bias={1: 5.0}, repetition_penalty=2.0, output=[1]),
                        row(top_k=2, top_p=0.5, min_p=0.2, temperature=0.5)])
    assert torch.equal(logits, before)
    with pytest.raises(ValueError):
        Sampler()(logits, [row()])
    with pytest.raises(ValueError):
        Sampler()(logits[0], [row()])
    assert Sampler()(torch.empty(0, 6), []) == ([], [])


def test_exactly_one_host_transfer(monkeypatch):
    calls = []
    for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **kw):
            calls.append(_name)
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, spy)
    logits = randn(5, 40, seed=9)
    rows = [row(temperature=0, logprobs=3), row([1, 2], [3], repetition_penalty=1.2, logprobs=1),
            row(top_k=5, top_p=0.8, min_p=0.1, logit_bias={4: 2.0}, min_tokens=3, eos=[0]),
            row(seed=5, generator=make_generator(5, "cpu"), frequency_penalty=0.3, output=[1, 1]),
            row(top_k=3)]
    Sampler(0)(logits, rows)
    assert calls == ["tolist"]


# ---------------------------------------------------------------- seeded reproducibility

def _model_logits(step: int, last: int, vocab: int) -> torch.Tensor:
    """Stand-in for a model: deterministic logits from the step and the previous token."""
    return randn(vocab, seed=1000 * step + last) * 1.5


def _run_seeded(params: dict, seed: int, batch: int, position: int, noise_seed: int, steps: int = 20):
    vocab, rng = 64, random.Random(noise_seed)
    sampler = Sampler(seed=noise_seed)
    out: list[int] = []
    gen = make_generator(seed, "cpu")
    others = [dict(), dict(temperature=0), dict(top_p=0.7), dict(top_k=5, min_p=0.05),
              dict(presence_penalty=1.0, temperature=1.3), dict(seed=99)]
    for step in range(steps):
        rows, logits = [], []
        for j in range(batch):
            if j == position:
                rows.append(row([1, 2, 3], out, generator=gen, seed=seed, **params))
                logits.append(_model_logits(step, out[-1] if out else 0, vocab))
            else:
                p = rng.choice(others)
                g = make_generator(p["seed"] + step, "cpu") if "seed" in p else None
                rows.append(row([5], [rng.randrange(vocab)], generator=g, **p))
                logits.append(randn(vocab, seed=rng.randrange(10**6)) * 2)
        out.append(sampler(torch.stack(logits), rows).token_ids[position])
    return out


@pytest.mark.parametrize("params", [
    dict(temperature=0.9),
    dict(top_k=10),
    dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.2, frequency_penalty=0.3),
])
def test_seeded_request_is_independent_of_batch(params):
    alone = _run_seeded(params, seed=42, batch=1, position=0, noise_seed=1)
    assert len(set(alone)) > 3  # really random, not collapsed onto one token
    for batch, position, noise_seed in ((4, 2, 2), (7, 0, 3), (3, 2, 4), (2, 1, 5)):
        assert _run_seeded(params, 42, batch, position, noise_seed) == alone
    assert _run_seeded(params, seed=43, batch=1, position=0, noise_seed=1) != alone


def test_unseeded_rows_follow_sampler_seed():
    logits = randn(6, 50, seed=10)
    rows = [row() for _ in range(6)]
    s1, s2, s3 = Sampler(7), Sampler(7), Sampler(8)
    seq1 = [s1(logits, rows).token_ids for _ in range(3)]
    assert seq1 == [s2(logits, rows).token_ids for _ in range(3)]
    assert seq1 != [s3(logits, rows).token_ids for _ in range(3)]
    assert seq1[0] != seq1[1]  # the shared generator advances


# ---------------------------------------------------------------- distributions

LOGITS5 = [1.0, 0.0, 2.0, -1.0, 0.5]


def _counts(tokens: list[int], vocab: int) -> list[int]:
    return [tokens.count(t) for t in range(vocab)]


def test_temperature_one_follows_softmax():
    n = 20_000
    logits = torch.tensor([LOGITS5] * n)
    tokens = Sampler(0)(logits, [row() for _ in range(n)]).token_ids
    assert chi_square(_counts(tokens, 5), ref_softmax(LOGITS5)) < CHI2_DF4_P001
    uniform = [0.2] * 5  # the statistic does reject a wrong distribution
    assert chi_square(_counts(tokens, 5), uniform) > 10 * CHI2_DF4_P001


def test_temperature_and_masks_follow_renormalised_softmax():
    n, xs = 20_000, [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]
    params = dict(temperature=0.7, top_k=7, top_p=0.95, min_p=0.05)
    scaled = [v / 0.7 for v in xs]
    kept = ref_top_k(scaled, 7)
    kept &= ref_top_p([v if i in kept else NEG_INF for i, v in enumerate(scaled)], 0.95)
    kept &= ref_min_p([v if i in kept else NEG_INF for i, v in enumerate(scaled)], 0.05)
    assert len(kept) == 5  # the masks bite: tokens 5, 6, 7 are removed
    tokens = Sampler(1)(torch.tensor([xs] * n), [row(**params) for _ in range(n)]).token_ids
    assert set(tokens) == kept
    probs = ref_softmax([scaled[i] for i in sorted(kept)])
    counts = [tokens.count(i) for i in sorted(kept)]
    assert chi_square(counts, probs) < CHI2_DF4_P001


def test_seeded_rows_follow_softmax():
    n = 5_000
    logits = torch.tensor([LOGITS5] * n)
    rows = [row(seed=s, generator=make_generator(s, "cpu")) for s in range(n)]
    tokens = Sampler(0)(logits, rows).token_ids
    assert chi_square(_counts(tokens, 5), ref_softmax(LOGITS5)) < CHI2_DF4_P001


# ---------------------------------------------------------------- CUDA (skipped on CPU)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_single_sync_and_greedy_parity():
    logits = randn(6, 1000, seed=11) * 3
    rows = [row(temperature=0, logprobs=5), row([1, 2], [3, 3], repetition_penalty=1.3, temperature=0),
            row(top_k=20, top_p=0.9, min_p=0.05, logit_bias={4: 2.0}, min_tokens=3, eos=[0], logprobs=2),
            row(seed=5, generator=make_generator(5, "cuda"), frequency_penalty=0.3, output=[1, 1]),
            row(top_k=3), row(temperature=0, presence_penalty=1.0, output=[7])]
    gpu_logits = logits.cuda()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = Sampler(0)(gpu_logits, rows)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    cpu = Sampler(0)(logits, rows)
    for j in (0, 1, 5):
        assert out.token_ids[j] == cpu.token_ids[j]
    for tok, lp in out.logprobs[0].items():
        assert lp == pytest.approx(cpu.logprobs[0][tok], abs=1e-4)
