"""What a request must satisfy to enter the engine: each rule written once, here.

The engine checks every request at `add_request`; a server asks the same rules earlier
(before it picks a default `max_tokens` or sends a response) through `LLMEngine.limits`.
A refusal is a `RequestError` (a ValueError) carrying the field it concerns (`param`) and
an OpenAI-style `code`; the API maps it to HTTP without restating the rule.

Two vocabularies bound a token id:
  - the model's (`vocab_size`, rows of the embedding): an id past it cannot be computed on;
  - the tokenizer's (`text_vocab_size`): an id past it has no text, so echo, logprobs and
    session transcripts would silently render it as "".
They differ when a checkpoint pads its embedding (the tiny test checkpoints: 384 rows,
375 tokens). Text callers (the HTTP API) need both, so their bound is the smaller one;
raw-id callers of the engine (offline runs, parity tests on random ids) need only the
model's, and an id the tokenizer lacks is still a valid input there.

An encoder-decoder model's prompt is its encoder's input (`encoder_max_len` tokens at most);
its decoder starts from one token, so `max_model_len - 1` tokens are left to generate
whatever the prompt's length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


class RequestError(ValueError):
    """A request the engine refuses. `str()` is the engine's wording; `api_message` the
    OpenAI-compatible wording a server shows (the same unless that wording predates this)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 api_message: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code
        self.api_message = message if api_message is None else api_message


class ContextLengthError(RequestError):
    """The prompt leaves no room to generate, or `max_tokens` does not fit the context."""

    def __init__(self, message: str, param: str | None, api_message: str | None = None) -> None:
        super().__init__(message, param, "context_length_exceeded", api_message)


TEXT_FIT_SLACK = 2  # normalizers may shrink text: `check_text` rejects only what cannot fit twice over


@dataclass(frozen=True)
class RequestLimits:
    """The engine's bounds on one request (immutable: any thread may read them)."""

    max_model_len: int  # prompt + generated tokens
    vocab_size: int  # the model's: ids it can compute on
    text_vocab_size: int  # the tokenizer's: ids it can decode
    max_token_chars: int = 1  # the tokenizer's longest token spelling: no token covers more text
    encoder_max_len: int | None = None  # encoder-decoder: the longest encoder input (the prompt)

    def token_bound(self, compute: bool = True, decode: bool = True) -> int:
        """One past the largest id allowed for a caller that needs the model to compute on
        the ids (`compute`) and/or the tokenizer to decode them (`decode`)."""
        bounds = ([self.vocab_size] if compute else []) + ([self.text_vocab_size] if decode else [])
        return min(bounds)

    def check_token_ids(self, ids: Sequence[int], label: str = "prompt token ids", param: str | None = "prompt",
                        compute: bool = True, decode: bool = True) -> None:
        """RequestError unless every id is in [0, token_bound(compute, decode))."""
        bound = self.token_bound(compute, decode)
        if ids and (min(ids) < 0 or max(ids) >= bound):
            raise RequestError(f"{label} must be in [0, {bound})", param)

    def check_prompt(self, ids: Sequence[int], param: str = "prompt", decode: bool = True) -> None:
        """A prompt's ids: at least one, each in range (`decode=False` for raw-id callers,
        see module doc). Its length is `room`'s business."""
        if not ids:
            raise RequestError("prompt must contain at least one token", param,
                               api_message="prompt must not be empty")
        self.check_token_ids(ids, param=param, decode=decode)

    def has_room(self, prompt_len: int) -> bool:
        """Whether a prompt this long leaves at least one token to generate."""
        if self.encoder_max_len is not None:
            return prompt_len <= self.encoder_max_len
        return prompt_len < self.max_model_len

    def room(self, prompt_len: int, param: str = "prompt") -> int:
        """Tokens left to generate after a prompt of `prompt_len`; ContextLengthError if none."""
        limit = self.max_model_len
        if self.encoder_max_len is not None:
            return self._decoder_room(prompt_len, param)
        if not self.has_room(prompt_len):
            raise ContextLengthError(
                f"prompt has {prompt_len} tokens but max_model_len is {limit}; it must leave room for at "
                f"least one generated token", param,
                api_message=f"this model's maximum context length is {limit} tokens, but the prompt has "
                            f"{prompt_len} tokens")
        return limit - prompt_len

    def _decoder_room(self, prompt_len: int, param: str) -> int:
        """An encoder-decoder's room: the decoder's context after its start token."""
        if not self.has_room(prompt_len):
            raise ContextLengthError(
                f"prompt has {prompt_len} tokens but the encoder takes at most {self.encoder_max_len}", param,
                api_message=f"this model's maximum input length is {self.encoder_max_len} tokens, but the "
                            f"prompt has {prompt_len} tokens")
        return self.max_model_len - 1

    @property
    def max_prompt_len(self) -> int:
        """The longest prompt that leaves room to generate."""
        return self.max_model_len - 1 if self.encoder_max_len is None else self.encoder_max_len

    def check_text(self, texts: Sequence[str], param: str) -> None:
        """ContextLengthError, before tokenizing (cheap), when the text alone cannot fit the
        context: it would need more than `max_model_len` tokens of `max_token_chars` each."""
        total = sum(map(len, texts))
        limit = self.max_prompt_len + 1
        if total > limit * self.max_token_chars * TEXT_FIT_SLACK:
            raise ContextLengthError(f"this model's maximum context length is {limit} tokens; "
                                     f"{total} characters of {param} cannot fit", param)

    def fit_max_tokens(self, prompt_len: int, requested: int | None, default: int | None,
                       param: str = "prompt") -> int:
        """The request's max_tokens: `default` (capped by the room) when it gives none;
        ContextLengthError when the prompt or the requested tokens do not fit."""
        room = self.room(prompt_len, param)
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            where = "the prompt has" if self.encoder_max_len is None else "the decoder starts with 1 token, the prompt has"
            raise ContextLengthError(
                f"max_tokens={requested} does not fit: {where} {prompt_len} tokens and the maximum "
                f"context length is {self.max_model_len} ({room} tokens left)", "max_tokens")
        return requested
