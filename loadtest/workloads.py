"""Request generators: what each workload sends, as `Job`s (one request, or one
multi-turn conversation). Deterministic for a given seed; text only, no tokenizer.

Prompt lengths are in words drawn from common English words that are one token each in
the usual BPE vocabularies, so `input_len` words are about `input_len` tokens; the real
counts always come from the server (`usage`), never from here.
"""
from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from loadtest.config import BenchConfig

WORDS = (  # noqa: SIM905 - a word list reads better as text
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were one all we can her has there been if more when will "
    "would who so no time only new some could these two may first then do any like my now "
    "over such our man me even most made after also did many before must through back years "
    "where much your way well down should because each just those people how too little state "
    "good very make world still own see men work long get here between both life being under "
    "never day same another know while last might us great old year off come since against go "
    "came right used take three"
).split()
SHAREGPT_SIGMA_IN = 1.0  # log-normal sigma of prompt lengths (ShareGPT-shaped long tail)
SHAREGPT_SIGMA_OUT = 0.8  # log-normal sigma of reply lengths
SHAREGPT_MAX_FACTOR = 8  # lengths clipped to [1, factor * median]


@dataclass(frozen=True)
class Turn:
    """One request: `prompt` text (a completion prompt, or a chat user message) and
    `max_tokens` to generate."""

    prompt: str
    max_tokens: int


@dataclass(frozen=True)
class Job:
    """A unit the scheduler issues: one request, or (`conversation`) a multi-turn chat whose
    turns run one after another, each waiting for the previous reply."""

    turns: tuple[Turn, ...]
    conversation: bool = False


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def around(rng: random.Random, n: int, ratio: float) -> int:
    """A length uniform in [n * (1 - ratio), n * (1 + ratio)], at least 1."""
    if ratio <= 0:
        return max(1, n)
    return max(1, rng.randint(math.floor(n * (1 - ratio)), math.ceil(n * (1 + ratio))))


def lognormal_len(rng: random.Random, median: int, sigma: float) -> int:
    return int(min(max(1, round(rng.lognormvariate(math.log(max(1, median)), sigma))),
                   SHAREGPT_MAX_FACTOR * median))


def _random(cfg: BenchConfig, rng: random.Random) -> Iterator[Job]:
    while True:
        text = words(rng, around(rng, cfg.input_len, cfg.range_ratio))
        yield Job((Turn(text, around(rng, cfg.output_len, cfg.range_ratio)),))


def _shared_prefix(cfg: BenchConfig, rng: random.Random) -> Iterator[Job]:
    prefix = words(rng, cfg.shared_prefix_len)
    for job in _random(cfg, rng):
        turn = job.turns[0]
        yield Job((Turn(f"{prefix}\n{turn.prompt}", turn.max_tokens),))


def _sharegpt_like(cfg: BenchConfig, rng: random.Random) -> Iterator[Job]:
    while True:
        prompt = words(rng, lognormal_len(rng, cfg.input_len, SHAREGPT_SIGMA_IN))
        yield Job((Turn(prompt, lognormal_len(rng, cfg.output_len, SHAREGPT_SIGMA_OUT)),))


def _sessions(cfg: BenchConfig, rng: random.Random) -> Iterator[Job]:
    while True:
        turns = tuple(Turn(f"Turn {t + 1}: {words(rng, around(rng, cfg.input_len, cfg.range_ratio))}",
                           around(rng, cfg.output_len, cfg.range_ratio)) for t in range(cfg.turns))
        yield Job(turns, conversation=True)


GENERATORS = {"random": _random, "shared-prefix": _shared_prefix, "sharegpt-like": _sharegpt_like,
              "sessions": _sessions}


def jobs(cfg: BenchConfig, seed: int) -> Iterator[Job]:
    """The run's jobs in order: `num_requests` (for sessions: `num_sessions`) of them, or
    endless when the run is bounded by `duration_s` only."""
    if cfg.workload not in GENERATORS:
        raise ValueError(f"unknown workload {cfg.workload!r}; one of {', '.join(GENERATORS)}")
    stream = GENERATORS[cfg.workload](cfg, random.Random(seed))
    count = cfg.num_sessions if cfg.workload == "sessions" else cfg.num_requests
    return stream if count is None else itertools.islice(stream, count)


def warmup_jobs(cfg: BenchConfig, seed: int) -> list[Job]:
    """`cfg.warmup` single requests shaped like the workload's, from another random stream
    (so they warm the server, not its prefix cache for the measured prompts)."""
    rng = random.Random(f"warmup-{seed}")
    return [Job((Turn(words(rng, cfg.input_len), cfg.output_len),)) for _ in range(cfg.warmup)]


def arrival_gaps(rate: float, burstiness: float, seed: int) -> Iterator[float]:
    """Seconds between successive arrivals: gamma(shape=burstiness) with mean 1/rate
    (burstiness 1 = Poisson; < 1 burstier, > 1 more regular); all 0 when rate is inf."""
    rng = random.Random(f"arrivals-{seed}")
    while True:
        yield 0.0 if math.isinf(rate) else rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
