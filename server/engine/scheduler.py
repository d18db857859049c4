"""Continuous batching over a paged KV pool.

Each step the scheduler hands out a token budget (`max_num_batched_tokens`):
  1. running decodes (one token each), then running prefill chunks, in admission order;
  2. if nothing had to be preempted, waiting sequences are admitted in FIFO order while
     blocks, budget and `max_num_seqs` allow; a prompt longer than the remaining budget
     is prefilled in chunks over several steps.
A running sequence that cannot get a block preempts the most recently admitted
unscheduled sequence (its blocks are freed, it goes back to the front of the queue with
its generated tokens, and is recomputed later, mostly from the prefix cache).
Writing into a block shared with another sequence (n > 1 forks) copies it first.
Sequences that score their prompt (prompt logprobs) share a second budget per step,
`max_prompt_logprob_tokens`, and take cached KV only where they have scored already
(server/engine/prompt_logprobs.py); one with `max_tokens=0` samples nothing and is
listed in `scored_only` when its prompt is done.
An encoder-decoder sequence also takes its cross blocks at admission (listed in `encode`:
the runner runs its encoder that step); its encoder tokens count against the token budget
(an input longer than the whole budget is admitted first in a step, alone over budget), and
its cross blocks are freed with its block table at finish, abort and preemption (readmission
encodes again).
With a `Speculator`, decoding sequences then draft (server/engine/speculate.py) with the
budget and free blocks left over (a draft never preempts or delays anyone): such a decode
computes 1 + K tokens, and `update` keeps the K/V of the accepted ones only, freeing the
blocks that held nothing but rejected positions.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from server.engine.config import DEFAULT_MAX_PROMPT_LOGPROB_TOKENS
from server.engine.memory import BlockPool, block_hash
from server.engine.sequence import Sequence, SequenceStatus
from server.engine.speculate import Speculator


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    max_prompt_logprob_tokens: int = DEFAULT_MAX_PROMPT_LOGPROB_TOKENS  # scored prompt tokens per step


@dataclass
class SchedulerOutput:
    """One step's work. `scheduled` keeps batch order; `samples` pairs the sequence whose
    last-position logits are used with the sequence that receives the sampled token (they
    differ only for n > 1 children forked from their parent's prompt)."""

    scheduled: dict[Sequence, int] = field(default_factory=dict)  # seq -> tokens this step
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) block copies
    samples: list[tuple[Sequence, Sequence]] = field(default_factory=list)
    scored_only: list[Sequence] = field(default_factory=list)  # max_tokens=0: prompt done, nothing to sample
    encode: list[Sequence] = field(default_factory=list)  # encoder-decoder: admitted now, encoder runs first
    drafts: dict[Sequence, list[int]] = field(default_factory=dict)  # decodes verifying a draft (in `scheduled`)
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Decides which sequences run each step and keeps their blocks; see module doc."""

    def __init__(
        self, config: SchedulerConfig, pool: BlockPool, reclaim: Callable[[], bool] | None = None,
        speculator: Speculator | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.reclaim = reclaim  # frees some idle memory (a session's pins); False when none is left
        self.speculator = speculator  # None: no drafting
        self.block_size = pool.block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self.requests: dict[str, list[Sequence]] = {}
        self.num_preemptions = 0

    # -- requests ---------------------------------------------------------------------
    def add(self, seqs: list[Sequence]) -> None:
        """Queue a request: seqs[0] computes the prompt, seqs[1:] fork from it."""
        parent, children = seqs[0], seqs[1:]
        for child in children:
            child.status = SequenceStatus.FORK_PENDING
        parent.fork_children = list(children)
        self.requests[parent.request_id] = list(seqs)
        self.waiting.append(parent)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sequence of the request with reason "abort"."""
        aborted = [s for s in self.requests.get(request_id, []) if not s.is_finished]
        for seq in aborted:
            self.finish(seq, "abort")
        return aborted

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        for child in seq.fork_children:  # a parent that ends before forking takes them along
            if not child.is_finished:
                self.finish(child, reason)
        seq.fork_children = []
        if all(s.is_finished for s in self.requests.get(seq.request_id, [])):
            self.requests.pop(seq.request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling -------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scored = self.config.max_prompt_logprob_tokens  # what scoring sequences may still take
        decodes = [s for s in self.running if s.num_uncomputed == 1]
        prefills = [s for s in self.running if s.num_uncomputed > 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this step
            num = min(seq.num_uncomputed, budget, scored if seq.scores_prompt else budget)
            if num and self._reserve(seq, num, out):
                out.scheduled[seq] = num
                budget -= num
                scored -= num if seq.scores_prompt else 0
        if out.num_preempted == 0:
            self._admit(budget, scored, out)
            if self.speculator is not None:
                self._add_drafts([s for s in decodes if out.scheduled.get(s) == 1], out)
        for seq, num in out.scheduled.items():
            if seq.num_computed_tokens + num - len(out.drafts.get(seq, ())) == seq.num_tokens:
                if seq.params.max_tokens == 0:
                    out.scored_only.append(seq)
                    continue
                out.samples.append((seq, seq))
                out.samples.extend((seq, child) for child in seq.fork_children)
        return out

    def _add_drafts(self, decoding: list[Sequence], out: SchedulerOutput) -> None:
        """Let scheduled decodes draft, within the budget and the allocatable blocks left
        (no reclaiming of session memory, no preemption)."""
        budget = self.config.max_num_batched_tokens - sum(out.scheduled.values())
        for seq in decoding:
            room = self.config.max_model_len - seq.num_tokens - 1  # the bonus token must fit too
            if seq.params.max_tokens is not None:
                room = min(room, seq.params.max_tokens - seq.num_output_tokens - 1)
            draft = self.speculator.propose(seq, min(budget, room), len(decoding))
            if not draft:
                continue
            needed = self._blocks_needed(seq, 1 + len(draft))
            if not self.pool.can_allocate(needed):
                continue
            seq.block_table.extend(self.pool.allocate(needed))
            out.scheduled[seq] = 1 + len(draft)
            out.drafts[seq] = draft
            budget -= len(draft)

    def _blocks_needed(self, seq: Sequence, num: int) -> int:
        total = -(-(seq.num_computed_tokens + num) // self.block_size)
        return max(0, total - len(seq.block_table))

    def _shared_tail(self, seq: Sequence) -> bool:
        """Whether this step writes into a partially filled block another sequence holds."""
        index = seq.num_computed_tokens // self.block_size
        return (
            seq.num_computed_tokens % self.block_size != 0
            and index < len(seq.block_table)
            and self.pool.refcount(seq.block_table[index]) > 1
        )

    def _reserve(self, seq: Sequence, num: int, out: SchedulerOutput) -> bool:
        """Give `seq` the blocks for `num` more tokens, preempting others if needed.
        Returns False if `seq` itself had to be preempted."""
        cow = self._shared_tail(seq)
        needed = self._blocks_needed(seq, num) + int(cow)
        while not self.pool.make_room(lambda: needed, self.reclaim):
            victims = [s for s in self.running if s is not seq and s not in out.scheduled]
            victim = victims[-1] if victims else seq
            self._preempt(victim)
            out.num_preempted += 1
            if victim is seq:
                return False
        if cow:
            self._copy_on_write(seq, seq.num_computed_tokens // self.block_size, out)
            needed -= 1
        seq.block_table.extend(self.pool.allocate(needed))
        return True

    def _cached_prefix(self, seq: Sequence) -> tuple[list[int], int]:
        """(blocks, tokens) of KV the sequence can start from: blocks it was handed (a
        session's resident memory) or the longest prefix-cache hit, always leaving at least
        one token to compute so there are logits to sample from, and for a sequence scoring
        its prompt, none past the positions it has scored (cached KV has no logits)."""
        limit = seq.num_scored_positions if seq.scores_prompt else seq.num_tokens - 1
        if seq.resume is not None:
            blocks, num = seq.resume
            keep = limit // self.block_size
            return seq.resume if num <= limit else (blocks[:keep], keep * self.block_size)
        if not self.pool.enable_prefix_caching:
            return [], 0
        max_hits = limit // self.block_size
        self._extend_hashes(seq, max_hits)
        hits = self.pool.lookup(seq.block_hashes[:max_hits])
        return hits, len(hits) * self.block_size

    def _copy_on_write(self, seq: Sequence, index: int, out: SchedulerOutput) -> None:
        """Give `seq` its own copy of block `index` before it writes into it."""
        old = seq.block_table[index]
        (new,) = self.pool.allocate(1)
        out.copies.append((old, new))
        self.pool.free([old])
        seq.block_table[index] = new

    def _release(self, seq: Sequence) -> None:
        self.pool.free(seq.block_table)
        self.pool.free(seq.cross_blocks)
        seq.block_table, seq.cross_blocks = [], []

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _admit(self, budget: int, scored: int, out: SchedulerOutput) -> None:
        """Admit waiting sequences in FIFO order within the token budgets (`scored`: tokens
        left for sequences scoring their prompt)."""
        admitted = False
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            slots = 1 + len(seq.fork_children)
            pending = sum(len(s.fork_children) for s in self.running)  # admitted, not yet forked
            if len(self.running) + pending + slots > self.config.max_num_seqs:
                break
            # Reuse cached full blocks, but always leave one token to compute (for logits).
            hits, num_cached = self._cached_prefix(seq)
            enc = len(seq.encoder_prompt) if seq.encoder_prompt is not None else 0  # its encoder runs now
            if enc and enc >= budget and (admitted or enc < self.config.max_num_batched_tokens):
                break  # waits for a step with room (one longer than any budget: first in a step)
            num = min(seq.num_tokens - num_cached, max(budget - enc, 1), scored if seq.scores_prompt else budget)
            if num == 0:
                break
            new_blocks = -(-(num_cached + num) // self.block_size) - len(hits)
            cross = -(-enc // self.block_size)
            cow = num_cached % self.block_size != 0  # resuming into a shared partial block
            if not self.pool.make_room(
                lambda: new_blocks + cross + cow + self.pool.num_acquirable_free(hits), self.reclaim
            ):
                break
            self.waiting.popleft()
            self.pool.acquire(hits)
            seq.block_table = hits + self.pool.allocate(new_blocks)
            if enc:
                seq.cross_blocks = self.pool.allocate(cross)
                out.encode.append(seq)
            seq.resume = None
            if cow:
                self._copy_on_write(seq, len(hits) - 1, out)
            seq.num_computed_tokens = num_cached
            if seq.num_cached_tokens is None:  # first admission only
                seq.num_cached_tokens = num_cached
                seq.first_scheduled_time = time.monotonic()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled[seq] = num
            budget = max(budget - num - enc, 0)
            scored -= num if seq.scores_prompt else 0
            admitted = True

    # -- after the forward ------------------------------------------------------------
    def update(self, out: SchedulerOutput, token_ids: list[list[int]]) -> None:
        """Advance counters, hash newly full blocks, fork n > 1 children, append tokens
        (per sample: a verified draft's accepted tokens, then the sampled one)."""
        gained = {dst: toks for (src, dst), toks in zip(out.samples, token_ids) if src in out.drafts}
        for seq, num in out.scheduled.items():
            if seq in out.drafts:  # the K/V of rejected draft positions does not count
                num -= len(out.drafts[seq]) - (len(gained[seq]) - 1)
            full_before = seq.num_computed_tokens // self.block_size
            seq.num_computed_tokens += num
            full_after = seq.num_computed_tokens // self.block_size
            if self.pool.enable_prefix_caching and full_after > full_before:
                self._extend_hashes(seq, full_after)
                for i in range(full_before, full_after):
                    self.pool.register(seq.block_table[i], seq.block_hashes[i])
        for (src, dst), tokens in zip(out.samples, token_ids):
            if dst.status is SequenceStatus.FORK_PENDING:
                self._fork(src, dst)
            dst.token_ids.extend(tokens)
        for seq in out.scheduled:
            seq.fork_children = [c for c in seq.fork_children if c.status is SequenceStatus.FORK_PENDING]
        for seq, draft in out.drafts.items():
            self._drop_rejected(seq)
            self.speculator.record(seq, len(draft), len(gained[seq]) - 1)

    def _drop_rejected(self, seq: Sequence) -> None:
        """Free the blocks past the computed tokens (they held rejected draft positions only;
        never hashed, since only computed full blocks are)."""
        keep = -(-seq.num_computed_tokens // self.block_size)
        if len(seq.block_table) > keep:
            self.pool.free(seq.block_table[keep:])
            del seq.block_table[keep:]

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Drop the tokens after the first `num_tokens` of a sequence about to finish there (a
        verified draft ran past its stop); its K/V counts up to the new last token."""
        del seq.token_ids[num_tokens:]
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens - 1)
        del seq.block_hashes[seq.num_computed_tokens // self.block_size :]

    def _fork(self, parent: Sequence, child: Sequence) -> None:
        """Child shares every block of the parent's computed prompt (refcounts)."""
        self.pool.acquire(parent.block_table)
        self.pool.acquire(parent.cross_blocks)
        child.block_table = list(parent.block_table)
        child.cross_blocks = list(parent.cross_blocks)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        child.first_scheduled_time = parent.first_scheduled_time
        child.status = SequenceStatus.RUNNING
        self.running.insert(self.running.index(parent) + 1, child)

    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        """Make sure `seq.block_hashes` covers its first `num_blocks` full blocks."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_blocks):
            parent = seq.block_hashes[i - 1] if i else seq.cache_root
            seq.block_hashes.append(block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs]))
