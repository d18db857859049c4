"""Prompt logprobs: how likely each prompt token was, given the tokens before it.

A sequence whose params ask for `prompt_logprobs=k` gets logits at every prompt position
it prefills, not only the last: the logits at position p score prompt token p + 1, so a
prompt of L tokens has L - 1 scores (entry 0 is None: nothing predicts the first token).
Only such sequences pay: `score_spans` is one attribute test per scheduled sequence, and
their rows ride after the sampled rows in the step's `rows` (so tensor parallelism gathers
them like any logits).

What the rest of the engine does for them:
  - KV computed earlier (the prefix cache, a session's resident blocks) came with no logits,
    so a sequence still scoring reuses cached KV only up to the positions it has scored
    already, block-aligned (`Scheduler._cached_prefix`). A scoring request therefore
    computes its whole prompt once; the blocks it fills join the prefix cache for others,
    and a preempted one resumes from the positions it had scored.
  - The scheduler gives scoring sequences at most `max_prompt_logprob_tokens` tokens per
    step between them, so these logits stay within [that, vocab] float32 per step.
  - The scores reach the client once, on the sequence's first output after its prompt
    (`StepOutput.prompt_logprobs`); `max_tokens=0` ends the request there (scoring only).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from server.engine.sequence import Sequence

_PACK_DTYPE = torch.float64  # holds token ids, ranks and float32 logprobs exactly for the one transfer


class PromptLogprob(NamedTuple):
    """One prompt token's score."""

    logprobs: dict[int, float]  # the top-k alternatives (most likely first), then the prompt token
    rank: int  # the prompt token's rank in its distribution (1: the most likely)


class ScoreSpan(NamedTuple):
    """Consecutive positions of one sequence scored this step."""

    seq: Sequence
    first_row: int  # row of `first_pos` in the step's flat token batch
    first_pos: int  # its logits score prompt token first_pos + 1
    count: int


def score_spans(scheduled: dict[Sequence, int]) -> list[ScoreSpan]:
    """The prompt positions of this step whose logits score a prompt token, per sequence
    (positions recomputed before `num_scored_positions`, after a preemption, are not redone)."""
    spans, offset = [], 0
    for seq, num in scheduled.items():
        if seq.prompt_logprobs is not None and seq.scores_prompt:
            start = seq.num_computed_tokens
            first = max(start, seq.num_scored_positions)
            stop = min(start + num, seq.prompt_len - 1)
            if stop > first:
                spans.append(ScoreSpan(seq, offset + first - start, first, stop - first))
        offset += num
    return spans


def span_rows(spans: list[ScoreSpan]) -> torch.Tensor:
    """[R] int64: the flat-batch rows of every span, in order."""
    return torch.cat([torch.arange(s.first_row, s.first_row + s.count) for s in spans])


def score(logits: torch.Tensor, spans: list[ScoreSpan]) -> dict[Sequence, list[PromptLogprob]]:
    """logits: [R, vocab] float32 of `span_rows(spans)` (consumed: overwritten in place).
    Returns each sequence's new scores in position order, after one host transfer. Ranks and
    top-k are read off the raw logits, then one in-place pass gives the log-normaliser
    (torch's logsumexp / log_softmax took 1.5-4x longer on [511, 49152] here)."""
    vocab = logits.shape[1]
    targets = [t for s in spans for t in s.seq.token_ids[s.first_pos + 1 : s.first_pos + 1 + s.count]]
    target = torch.tensor(targets, dtype=torch.int64, device=logits.device)
    raw = logits.gather(1, target[:, None])                                # [R, 1]
    rank = (logits > raw).sum(dim=-1, dtype=torch.int32) + 1               # [R]
    k = min(max(s.seq.params.prompt_logprobs for s in spans), vocab)
    if k > 0:
        top_raw, top_ids = logits.topk(k, dim=-1)                          # [R, k]
    peak = logits.amax(dim=-1, keepdim=True)                               # [R, 1]
    norm = peak + logits.sub_(peak).exp_().sum(dim=-1, keepdim=True).log_()  # [R, 1] log-sum-exp
    parts = [(raw - norm).squeeze(1), rank]
    if k > 0:
        parts += [top_ids.flatten(), (top_raw - norm).flatten()]
    flat = torch.cat([p.to(_PACK_DTYPE) for p in parts]).tolist()         # the one sync
    num = len(targets)
    chosen_lp, ranks, top_ids_l, top_lp_l = flat[:num], flat[num:2 * num], flat[2 * num:2 * num + num * k], \
        flat[2 * num + num * k:]
    out: dict[Sequence, list[PromptLogprob]] = {}
    row = 0
    for s in spans:
        want = min(s.seq.params.prompt_logprobs, k)
        scores = out.setdefault(s.seq, [])
        for _ in range(s.count):
            entry = {int(top_ids_l[row * k + m]): top_lp_l[row * k + m] for m in range(want)}
            entry.setdefault(targets[row], chosen_lp[row])
            scores.append(PromptLogprob(entry, int(ranks[row])))
            row += 1
    return out
