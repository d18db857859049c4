"""Sequence: one generation stream's token ids and progress counters.

`token_ids` is prompt + output. `num_computed_tokens` (tokens whose K/V are in the
sequence's blocks) is the single source of truth for progress: the tokens still to
compute are `token_ids[num_computed_tokens:]`, and when that range is fully computed
in a step, the last position's logits produce the next token.

An encoder-decoder request's `token_ids` are its decoder's (the decoder start token, then the
output); its prompt is `encoder_prompt`, whose K/V sit in `cross_blocks` while it runs
(model/encdec.py): allocated and written at admission, freed with the block table.
"""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from model.sampling import SamplingParams, make_generator

if TYPE_CHECKING:
    from server.engine.prompt_logprobs import PromptLogprob
    from server.engine.sessions import SessionTurn

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued (new or preempted); holds no blocks
    RUNNING = "running"  # admitted; holds blocks
    FORK_PENDING = "fork_pending"  # n > 1 child waiting for its parent's prompt
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Token ids, block table and counters of one sequence (hashable by identity)."""

    request_id: str
    prompt_len: int
    token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    index: int = 0  # which of the request's n completions
    generator: torch.Generator | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the full, computed blocks
    cache_root: int = 0  # parent hash of the first block: model identity + cache salt (memory.root_hash)
    num_computed_tokens: int = 0
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache served at first admission
    fork_children: list["Sequence"] = field(default_factory=list)  # n > 1 siblings to fork
    finish_reason: str | None = None
    session_turn: SessionTurn | None = None  # set when this sequence is a session's turn
    resume: tuple[list[int], int] | None = None  # (blocks, n): KV of the first n tokens, held already
    grammar: Any = None  # GrammarState when the output is constrained (server/engine/grammar.py)
    draft_state: Any = None  # DraftState once it has drafted (server/engine/speculate.py)
    # prompt_logprobs requests (the prompt-computing sequence only): entry i scores prompt token i
    # (entry 0 is None: nothing predicts it); filled chunk by chunk, handed out once complete
    prompt_logprobs: list[PromptLogprob | None] | None = None
    encoder_prompt: list[int] | None = None  # encoder-decoder: the encoder's input
    cross_blocks: list[int] = field(default_factory=list)  # its encoder K/V; empty while waiting
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None

    @classmethod
    def new(
        cls, request_id: str, prompt: list[int], params: SamplingParams, eos_token_ids: tuple[int, ...],
        device: torch.device | str = "cpu", index: int = 0,
    ) -> "Sequence":
        generator = None
        if params.seed is not None:  # n > 1 siblings get distinct, still reproducible streams
            generator = make_generator((params.seed + index * 0x9E3779B97F4A7C15) % (1 << 63), device)
        return cls(
            request_id=request_id, prompt_len=len(prompt), token_ids=list(prompt), params=params,
            eos_token_ids=eos_token_ids, index=index, generator=generator,
            prompt_logprobs=[None] if params.prompt_logprobs is not None and index == 0 else None,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """The prompt's length as the caller sees it (the encoder's input for encoder-decoder)."""
        return self.prompt_len if self.encoder_prompt is None else len(self.encoder_prompt)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def scores_prompt(self) -> bool:
        """Whether prompt positions are still to be scored: their logits are needed, so
        neither the prefix cache nor a session's KV may skip them."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.prompt_len

    @property
    def num_scored_positions(self) -> int:
        """Positions whose logits already scored the next prompt token (KV before them
        may come from the cache; only meaningful while `scores_prompt`)."""
        return len(self.prompt_logprobs) - 1

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.prompt_len]

    @property
    def queue_time(self) -> float:
        """Seconds between arrival and first admission (so far, if not admitted yet)."""
        return (self.first_scheduled_time or time.monotonic()) - self.arrival_time

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
