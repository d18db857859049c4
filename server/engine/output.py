"""What the engine hands back: per-step deltas (`StepOutput`) and, for the offline API,
whole results (`RequestOutput`). `TextStream` turns a sequence's tokens into text deltas
and applies stop strings (the only place the engine touches text)."""
from __future__ import annotations

from dataclasses import dataclass, field

from model.tokenizer import IncrementalDetokenizer, StopStringChecker, Tokenizer
from server.engine.prompt_logprobs import PromptLogprob
from server.engine.sequence import Sequence


@dataclass
class StepOutput:
    """New tokens of one sequence in one step."""

    request_id: str
    index: int  # which of the request's n completions
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None
    text: str  # text delta (stop strings removed)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_cached_tokens: int
    queue_time: float  # seconds from arrival to first admission
    error: str | None = None  # set when the engine failed this request alone (finish_reason "abort")
    # once per prompt, on the first output after it is computed, when params.prompt_logprobs is set:
    # one entry per prompt token (the first None)
    prompt_logprobs: list[PromptLogprob | None] | None = None


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    """A finished request: `outputs` holds its n completions; the top-level fields are
    the first completion's."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    prompt_logprobs: list[PromptLogprob | None] | None = None  # with params.prompt_logprobs

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs


class TextStream:
    """Incremental text of one sequence with stop strings applied."""

    def __init__(self, tokenizer: Tokenizer, seq: Sequence) -> None:
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, seq.prompt_token_ids, skip_special_tokens=seq.params.skip_special_tokens
        )
        self.stops = StopStringChecker(seq.params.stop) if seq.params.stop else None
        self.text = ""  # everything emitted so far

    def add(self, token_ids: list[int]) -> tuple[str, bool]:
        """(text to emit, whether a stop string matched)."""
        delta = self.detokenizer.add(token_ids)
        out = (delta, False) if self.stops is None else self.stops.feed(delta)
        self.text += out[0]
        return out

    def flush(self) -> str:
        """Text held back at the end (an unfinished character, a partial stop string)."""
        tail = self.detokenizer.flush()
        if self.stops is None:
            return tail
        text, stopped = self.stops.feed(tail)
        return text if stopped else text + self.stops.flush()
