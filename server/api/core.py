"""The generation core of the agent protocols (Responses, Messages): one turn's prompt,
sampling, tool plan and session in; protocol-neutral events out.

    TurnSpec --Turn.start()--> (errors: APIError before any byte is sent)
             --Turn.events()--> ReasoningDelta* TextDelta* ToolCallDone* ... TurnEnd (last)

An adapter (server/api/responses.py, messages.py) translates its request into a TurnSpec
and these events into its wire format. With a reasoning parser (`thinking` set), the
<think> block arrives as ReasoningDelta, never as text. Text that is a tool call (the plan's
format) never reaches the adapter as text: it arrives as one ToolCallDone once its block closes. Closing
the event iterator (a client gone) or `Turn.cancel()` aborts the engine request; a session
turn that did not finish leaves its session as it was.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Union

from model.sampling import SamplingParams
from server.api.serving import Generation, Usage
from server.api.reasoning import ThinkStream
from server.api.state import AppState
from server.api.tools import NO_TOOLS, ToolPlan


@dataclass(frozen=True)
class TurnSpec:
    """What an adapter asks the core to run (one prompt, one completion)."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    tools: ToolPlan = NO_TOOLS
    session_id: str | None = None  # run as this session's turn (its KV resumed, its transcript extended)
    new_messages: list[dict] | None = None  # what the turn adds to the session's messages
    cache_salt: str | None = None
    single_call: bool = False  # parallel_tool_calls=false: calls after the first are dropped
    thinking: bool | None = None  # a reasoning parser runs: whether the output starts inside <think>


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


CoreEvent = Union[TextDelta, ReasoningDelta, ToolCallDone, TurnEnd]


class Turn:
    """One running turn (see the module doc)."""

    def __init__(self, state: AppState, spec: TurnSpec) -> None:
        self.spec = spec
        self.gen = Generation(state, spec.request_id, [spec.prompt], [spec.params], spec.session_id,
                              spec.new_messages, spec.cache_salt)
        self._events = self.gen.events()
        self._first = None

    @property
    def usage(self) -> Usage:
        return self.gen.usage

    async def start(self) -> None:
        """Submit the request and wait for its first output: a refused request raises its
        APIError here, before the adapter answers anything."""
        self._first = await anext(self._events)

    async def aclose(self) -> None:
        """Stop the turn if it still runs (its engine request aborted); idempotent."""
        await self._events.aclose()

    def cancel(self) -> None:
        """Abort the engine request; the stream ends with finish_reason "abort"."""
        self.gen.engine.abort(f"{self.spec.request_id}-0")

    async def events(self) -> AsyncIterator[CoreEvent]:
        splitter = self.spec.tools.splitter() if self.spec.tools.parse else None
        think = ThinkStream(self.spec.thinking) if self.spec.thinking is not None else None
        num_calls = 0
        try:
            item = self._first
            while item is not None:
                choice, out = item
                reasoning, text = think.feed(out.text) if think else ("", out.text)
                if out.finished and think is not None:
                    more, tail = think.flush()
                    reasoning, text = reasoning + more, text + tail
                if reasoning:
                    yield ReasoningDelta(reasoning)
                text, calls = splitter.feed(text) if splitter else (text, [])
                if out.finished and splitter is not None:
                    tail, more = splitter.flush()
                    text, calls = text + tail, calls + more
                if text:
                    yield TextDelta(text)
                for call in calls:
                    if num_calls and self.spec.single_call:
                        continue
                    num_calls += 1
                    yield ToolCallDone({k: v for k, v in call.items() if k != "index"})
                if out.finished:
                    reason = out.finish_reason or "stop"
                    if num_calls and reason == "stop":
                        reason = "tool_calls"
                    yield TurnEnd(reason, choice.text, list(choice.token_ids), self.gen.usage, num_calls,
                                  self._stop_sequence(choice.token_ids, choice.text, reason),
                                  think.reasoning if think else "")
                    return
                item = await anext(self._events, None)
        finally:
            await self._events.aclose()

    def _stop_sequence(self, token_ids: list[int], text: str, reason: str) -> str | None:
        """The stop string that ended the output: the engine cuts it from the text, so it is
        what the decoded tokens hold past the text."""
        stops = self.spec.params.stop
        if reason != "stop" or not stops:
            return None
        tail = self.gen.engine.tokenizer.decode(token_ids, skip_special_tokens=True)[len(text):]
        return next((s for s in stops if tail.startswith(s)), None)
