"""The core seen by the one-choice agent protocols (Responses, Messages): one turn's Deltas as
protocol-neutral events.

    GenerationSpec (one prompt, n = 1) --Turn.start()--> (errors: APIError before any byte)
        --Turn.events()--> ReasoningDelta* TextDelta* ToolCallDone* ... TurnEnd (last)

Closing the event iterator (a client gone) or `Turn.cancel()` aborts the engine request; a
session turn that did not finish leaves its session as it was.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Union

from server.api.core import Delta, Generation, GenerationSpec, Usage
from server.api.state import AppState


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDone:
    """One whole call: {"id", "type": "function", "function": {"name", "arguments": JSON text}}."""

    call: dict


@dataclass(frozen=True)
class TurnEnd:
    """The last event. finish_reason: "stop" | "length" | "abort" | "tool_calls"; `text` is
    the whole raw output (what a session keeps), `stop_sequence` the stop string that ended
    it, if one did."""

    finish_reason: str
    text: str
    token_ids: list[int]
    usage: Usage
    num_calls: int
    stop_sequence: str | None
    reasoning: str = ""  # the whole reasoning text (ReasoningDelta's sum)


TurnEvent = Union[TextDelta, ReasoningDelta, ToolCallDone, TurnEnd]


class Turn:
    """One running turn (see the module doc)."""

    def __init__(self, state: AppState, spec: GenerationSpec) -> None:
        assert len(spec.prompts) == 1 and spec.params[0].n == 1, "a turn has one choice"
        self.spec = spec
        self.gen = Generation(state, spec)

    @property
    def usage(self) -> Usage:
        return self.gen.usage

    async def start(self) -> None:
        await self.gen.start()

    async def aclose(self) -> None:
        await self.gen.aclose()

    def cancel(self) -> None:
        self.gen.cancel()

    async def events(self) -> AsyncIterator[TurnEvent]:
        try:
            async for d in self.gen.events():
                if d.reasoning:
                    yield ReasoningDelta(d.reasoning)
                if d.text:
                    yield TextDelta(d.text)
                for call in d.calls:
                    yield ToolCallDone({k: v for k, v in call.items() if k != "index"})
                if d.out.finished:
                    yield self._end(d)
                    return
        finally:
            await self.gen.aclose()

    def _end(self, d: Delta) -> TurnEnd:
        choice, parser = d.choice, self.gen.parsers[0]
        reason = d.finish_reason or ("tool_calls" if parser.num_calls else "stop")
        return TurnEnd(reason, choice.text, list(choice.token_ids), self.gen.usage, parser.num_calls,
                       self._stop_sequence(choice.token_ids, choice.text, reason),
                       parser.think.reasoning if parser.think else "")

    def _stop_sequence(self, token_ids: list[int], text: str, reason: str) -> str | None:
        """The stop string that ended the output: the engine cuts it from the text, so it is
        what the decoded tokens hold past the text."""
        stops = self.spec.params[0].stop
        if reason != "stop" or not stops:
            return None
        tail = self.gen.engine.tokenizer.decode(token_ids, skip_special_tokens=True)[len(text):]
        return next((s for s in stops if tail.startswith(s)), None)
