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


# Copy-heavy prompts (`copy` workload): the answer repeats spans of the prompt, as chat edits,
# summaries that quote and RAG answers do. Plain sentences a small model copies reliably.
SENTENCES = (
    "The river runs past the old mill and turns west at the stone bridge.",
    "Every block in the pool has a reference count and a hash of its tokens.",
    "The train to the coast leaves at seven and arrives a little after noon.",
    "A session keeps its memory between turns, so the next turn reads only its new words.",
    "She wrote the letter twice, because the first copy was lost in the rain.",
    "The garden has three apple trees, a pear tree and a row of tall sunflowers.",
    "When the cache is full, the least recently used blocks are freed first.",
    "The library opens at nine on weekdays and at ten on Saturday mornings.",
    "He measured the table, cut the wood, and fixed the broken leg with glue.",
    "The server answers every request with a status code and a short message.",
    "In winter the lake freezes, and children skate across it after school.",
    "The report lists the costs of each project and the month it was finished.",
)
CODE_TEMPLATES = (
    "def {f}(items, limit={n}):\n    total = 0\n    for item in items:\n        if item > limit:\n"
    "            total += item\n    return total\n",
    "def {f}(text):\n    words = text.split()\n    counts = {{}}\n    for word in words:\n"
    "        counts[word] = counts.get(word, 0) + {n}\n    return counts\n",
    "class {c}:\n    def __init__(self, size={n}):\n        self.size = size\n        self.items = []\n\n"
    "    def {f}(self, item):\n        if len(self.items) < self.size:\n            self.items.append(item)\n",
)
NAMES = ("load", "scan", "merge", "count", "store", "fetch", "check", "build", "parse", "index")


def _copy(cfg: BenchConfig, rng: random.Random) -> Iterator[Job]:
    """Chat prompts whose answer is mostly text from the prompt: repeat a passage, rewrite code
    with one change, quote a document (in turn). `input_len` is unused: the texts set it."""
    for i in itertools.count():
        passage = " ".join(rng.sample(SENTENCES, 5))
        if i % 3 == 0:
            prompt = f"Repeat this passage exactly, word for word:\n\n{passage}"
        elif i % 3 == 1:
            old, new = rng.sample(NAMES, 2)
            code = rng.choice(CODE_TEMPLATES).format(f=old, c=old.title() + "Box", n=rng.randint(2, 99))
            prompt = (f"Rewrite this Python code with the function `{old}` renamed to `{new}`. "
                      f"Change nothing else and return the whole code.\n\n```python\n{code}```")
        else:
            prompt = (f"Document:\n{passage}\n\nAnswer by quoting the document: what does it say? "
                      "Quote every sentence.")
        yield Job((Turn(prompt, around(rng, cfg.output_len, cfg.range_ratio)),))


def _sessions(cfg: BenchConfig, rng: random.Random) -> Iterator[Job]:
    while True:
        turns = tuple(Turn(f"Turn {t + 1}: {words(rng, around(rng, cfg.input_len, cfg.range_ratio))}",
                           around(rng, cfg.output_len, cfg.range_ratio)) for t in range(cfg.turns))
        yield Job(turns, conversation=True)


GENERATORS = {"random": _random, "shared-prefix": _shared_prefix, "sharegpt-like": _sharegpt_like,
              "sessions": _sessions, "copy": _copy}


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
