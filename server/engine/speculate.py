"""Speculative decoding by n-gram (prompt-lookup) drafting: propose, then accept or reject.

Drafting: a decoding sequence's last n tokens (n from `ngram_max` down to `ngram_min`) are
looked up among its own earlier tokens (prompt + output: for a session turn, the whole
conversation); the up to K tokens that followed the most recent earlier occurrence are the
draft. `NgramIndex` keeps every n-gram's last end position and grows by the new tokens
only, so a step costs O(new tokens), not O(context).

Verifying (the runner): the step computes the sequence's pending token and its K draft
tokens in one forward, keeping the logits of all 1 + K positions; `verify` then walks them
with the rejection rule of speculative sampling for a point-mass draft q = delta(d):
  greedy rows: accept d_j while it is the argmax of position j;
  random rows: accept d_j with probability p_j(d_j) (p: the distribution the sampler would
    draw from there); at the first rejection draw from p_j with d_j removed (renormalized);
    after K acceptances draw the bonus token from p_K,
so the output distribution is the sampler's own (greedy: token-identical). Each verified
sequence gains 1 + accepted tokens; the scheduler discards the rejected positions' K/V.

Turning down: each sequence keeps a moving average of its acceptance rate; below
`min_acceptance` it stops drafting for `retry_steps` decode steps, then tries again, so a
sequence with nothing to copy pays almost nothing. No drafting while `max_batch` or more
sequences decode (the batch is no longer memory-bound there).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import torch

from model.sampling import Sampler, SamplingRow, process_logits, sampling_probs

SPECULATIVE_METHODS = ("ngram",)
DEFAULT_NUM_SPECULATIVE_TOKENS = 4
DEFAULT_NGRAM_MIN = 2
DEFAULT_NGRAM_MAX = 4
DEFAULT_MIN_ACCEPTANCE = 0.25  # acceptance moving average below which a sequence stops drafting
DEFAULT_RETRY_STEPS = 16  # decode steps a turned-down sequence waits before drafting again
DEFAULT_MAX_BATCH = 8  # no drafting while this many sequences decode (compute-bound from there)
ACCEPTANCE_SMOOTHING = 0.3  # weight of the newest step in the acceptance moving average


@dataclass(frozen=True)
class SpeculativeConfig:
    """How (and whether) decoding sequences draft; see module doc."""

    method: str | None = None  # None: off; "ngram"
    num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS
    ngram_min: int = DEFAULT_NGRAM_MIN
    ngram_max: int = DEFAULT_NGRAM_MAX
    min_acceptance: float = DEFAULT_MIN_ACCEPTANCE
    retry_steps: int = DEFAULT_RETRY_STEPS
    max_batch: int = DEFAULT_MAX_BATCH

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be one of {SPECULATIVE_METHODS} or None, got {self.method!r}")
        for name in ("num_speculative_tokens", "ngram_min", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ngram_max < self.ngram_min:
            raise ValueError(f"ngram_max ({self.ngram_max}) must be >= ngram_min ({self.ngram_min})")
        if not 0.0 <= self.min_acceptance <= 1.0:
            raise ValueError(f"min_acceptance must be in [0, 1], got {self.min_acceptance}")
        if self.retry_steps < 0:
            raise ValueError(f"retry_steps must be >= 0, got {self.retry_steps}")

    @property
    def enabled(self) -> bool:
        return self.method is not None


class NgramIndex:
    """The last end position of every n-gram (ngram_min <= n <= ngram_max) of one token
    list that only grows. Keys are hashes of the n-gram tuples: a collision only makes a
    wrong draft, which verification rejects."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.last: dict[int, int] = {}  # hash(n-gram) -> end (exclusive) of its latest indexed occurrence
        self.indexed = 0  # n-grams ending at or before this position are in `last`

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest
        matching suffix of `tokens` ([] when none matches)."""
        end = len(tokens)
        for e in range(max(self.indexed + 1, self.lo), end):  # index n-grams ending before `end`
            for n in range(self.lo, min(self.hi, e) + 1):
                self.last[hash(tuple(tokens[e - n : e]))] = e
        self.indexed = max(self.indexed, end - 1)
        for n in range(min(self.hi, end - 1), self.lo - 1, -1):
            e = self.last.get(hash(tuple(tokens[end - n :])))
            if e is not None:
                return tokens[e : e + k]
        return []


@dataclass
class DraftState:
    """One sequence's drafting state (lives on the Sequence; tokens only grow, so it
    survives preemption)."""

    index: NgramIndex
    acceptance: float = 1.0  # moving average of accepted / drafted
    cooldown: int = 0  # decode steps left before drafting again


@dataclass
class SpeculationStats:
    """Counters since start: draft tokens proposed and accepted, and verified sequence-steps
    (tokens per verify = 1 + accepted / verifies)."""

    drafted: int = 0
    accepted: int = 0
    verifies: int = 0


@dataclass
class Speculator:
    """Proposes drafts for the scheduler and learns from their verification."""

    config: SpeculativeConfig
    stats: SpeculationStats = field(default_factory=SpeculationStats)

    def propose(self, seq, limit: int, num_decoding: int) -> list[int]:
        """The draft for decoding `seq` ([] if it should not draft now): at most `limit`
        tokens. Rows that need each token's own top-k logprobs or a grammar's per-token
        mask do not draft (see README)."""
        cfg = self.config
        if limit < 1 or num_decoding >= cfg.max_batch or seq.grammar is not None or seq.params.logprobs is not None:
            return []
        state = self._state(seq)
        if state.cooldown > 0:
            state.cooldown -= 1
            return []
        return state.index.propose(seq.token_ids, min(limit, cfg.num_speculative_tokens))

    def _state(self, seq) -> DraftState:
        if seq.draft_state is None:
            seq.draft_state = DraftState(NgramIndex(self.config.ngram_min, self.config.ngram_max))
        return seq.draft_state

    def record(self, seq, drafted: int, accepted: int) -> None:
        """After verifying a draft of `drafted` tokens of which `accepted` were kept."""
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        self.stats.verifies += 1
        state = self._state(seq)
        state.acceptance += ACCEPTANCE_SMOOTHING * (accepted / drafted - state.acceptance)
        if state.acceptance < self.config.min_acceptance:
            state.cooldown = self.config.retry_steps
            state.acceptance = self.config.min_acceptance  # one good draft after the pause resumes drafting


def verify(
    sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow], drafts: list[list[int]],
) -> list[list[int]]:
    """Accept or reject drafts. `logits` [P, V]: for each sequence in order, the 1 + K rows of
    its positions (row j predicts the token after draft j - 1; `rows[i]` holds row i's
    sampling params and history, the draft prefix included); `drafts[s]`: sequence s's K
    draft tokens. Returns each sequence's new tokens; one host sync."""
    device = logits.device
    x = process_logits(logits, rows)                                         # [P, V]
    draft_of = []  # per row: the draft token it checks, or -1 for each sequence's last row
    for draft in drafts:
        draft_of += draft + [-1]
    draft_t = torch.tensor(draft_of, dtype=torch.long, device=device)        # [P]
    has_draft = draft_t >= 0
    safe = draft_t.clamp_min(0)[:, None]
    choice = x.argmax(dim=-1)                                                # greedy rows' answer
    accept = choice == draft_t
    ridx = [i for i, r in enumerate(rows) if not r.params.greedy]
    if ridx:
        ridx_t = torch.tensor(ridx, dtype=torch.long, device=device)
        sub = [rows[i] for i in ridx]
        probs = sampling_probs(x.index_select(0, ridx_t), sub)               # [R, V], unnormalized
        probs = probs / probs.sum(dim=-1, keepdim=True)
        p_draft = probs.gather(1, safe.index_select(0, ridx_t)).squeeze(1)   # [R]
        accept.index_copy_(0, ridx_t, sampler.uniform(probs.shape[0], device, sub) < p_draft)
        residual = probs.scatter(1, safe.index_select(0, ridx_t), 0.0)      # d_j removed (rows with a draft)
        keep = has_draft.index_select(0, ridx_t) & (residual.sum(dim=-1) > 0)  # p_j(d_j) = 1: nothing else
        residual = torch.where(keep[:, None], residual, probs)
        choice.index_copy_(0, ridx_t, residual.div_(sampler.noise(residual, sub)).argmax(dim=-1))
    flat = torch.cat([accept.long(), choice]).tolist()                       # the one sync
    num = len(draft_of)
    accepted, chosen = flat[:num], flat[num:]
    out, start = [], 0
    for draft in drafts:
        a = 0
        while a < len(draft) and accepted[start + a]:
            a += 1
        out.append(draft[:a] + [chosen[start + a]])
        start += len(draft) + 1
    return out
