"""Reasoning output: a thinking model's `<think>...</think>` text kept apart from its answer.

    parser "think"  Qwen3 / DeepSeek-R1 style: the output is `<think>` reasoning `</think>`
                    answer. A template whose generation prompt already opens the block
                    (DeepSeek-R1; Qwen3 with thinking on) starts the output inside it; one that
                    closes it (Qwen3's enable_thinking=false) starts in the answer.
    "auto"          "think" when the chat template mentions <think>, else none (--reasoning-parser)

`ThinkStream` splits streamed text into (reasoning, answer) deltas, holding back what may be
the start of a tag. The raw text (tags included) is what a session's transcript keeps: the
template's own rule decides what of old thinking the next turn's prompt shows.
"""
from __future__ import annotations

import json
from typing import Any

REASONING_PARSERS = ("auto", "none", "think")
OPEN, CLOSE = "<think>", "</think>"
MAX_TEMPLATE_KWARGS_BYTES = 4096  # chat_template_kwargs as JSON
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token")


def reasoning_parser(chat_template: str | None, choice: str) -> str | None:
    """The parser a server runs ("think" or None) for its template and --reasoning-parser."""
    if choice == "auto":
        return "think" if OPEN in (chat_template or "") else None
    return None if choice == "none" else choice


PROMPT_TAIL_TOKENS = 16  # the prompt's last tokens, decoded to see whether it opens a think block


def opens_thinking(tok: Any, prompt: list[int]) -> bool:
    """Whether the prompt (token ids) ends inside an opened think block."""
    return tok.decode(prompt[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False).rstrip().endswith(OPEN)


def template_kwargs(given: dict[str, Any] | None) -> dict[str, Any]:
    """`chat_template_kwargs` checked: no key the server sets itself; ValueError naming it."""
    kwargs = dict(given or {})
    for key in kwargs:
        if key in RESERVED_TEMPLATE_KWARGS or not key.isidentifier():
            raise ValueError(f"chat_template_kwargs may not set {key!r}")
    if len(json.dumps(kwargs)) > MAX_TEMPLATE_KWARGS_BYTES:
        raise ValueError(f"chat_template_kwargs is over {MAX_TEMPLATE_KWARGS_BYTES} bytes as JSON")
    return kwargs


class ThinkStream:
    """Streamed text -> (reasoning delta, answer delta)."""

    def __init__(self, thinking: bool) -> None:
        self.thinking = thinking  # inside the think block now
        self._started = thinking  # the block was opened (by the prompt or the output)
        self._buf = ""
        self._strip = False  # a tag just ended: the newlines that follow it are the template's, not text
        self.reasoning = ""  # all of it so far

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        reasoning = answer = ""
        while self._buf:
            if self._strip:
                self._buf = self._buf.lstrip("\n")
                self._strip = not self._buf
                continue
            if self.thinking:
                end = self._buf.find(CLOSE)
                if end < 0:
                    keep = _partial(self._buf, CLOSE)
                    reasoning += self._buf[:len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                reasoning += self._buf[:end]
                self._buf, self.thinking, self._strip = self._buf[end + len(CLOSE):], False, True
            elif not self._started:
                stripped = self._buf.lstrip()
                if stripped.startswith(OPEN):
                    self._buf, self.thinking, self._started, self._strip = stripped[len(OPEN):], True, True, True
                elif OPEN.startswith(stripped):  # maybe the tag, not whole yet
                    break
                else:
                    self._started = True  # no think block: all answer
            else:
                answer += self._buf
                self._buf = ""
        self.reasoning += reasoning
        return reasoning, answer

    def flush(self) -> tuple[str, str]:
        rest, self._buf = self._buf, ""
        if self.thinking:
            self.reasoning += rest
            return rest, ""
        return "", rest


def split_reasoning(text: str, thinking: bool) -> tuple[str, str]:
    """(reasoning, answer) of a whole output."""
    stream = ThinkStream(thinking)
    r1, a1 = stream.feed(text)
    r2, a2 = stream.flush()
    return r1 + r2, a1 + a2


def _partial(text: str, marker: str) -> int:
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
