"""The generation core: every protocol's request runs here, whatever its wire format.

    GenerationSpec --Generation.start()--> (errors: APIError before any byte is sent)
                   --Generation.events()--> Delta per engine output, choices interleaved

An adapter (completions.py, chat.py, session_routes.py, responses.py, messages.py) turns
its request into a GenerationSpec (prompts, sampling, tool plan, session) and the Deltas
into its wire format; the one-choice agent protocols read them through `Turn` (turn.py).

A request with P prompts and n completions each has P*n choices, indexed
`prompt_index * n + completion_index`, as OpenAI does. Each prompt is one engine request
(`{request_id}-{prompt_index}`); closing the events (a client gone) aborts all of them. The
core records usage and metrics, maps every engine refusal or failure to its APIError once,
and splits each choice's text: with a reasoning parser (`thinking` set) the <think> block
comes as `Delta.reasoning`; with a tool plan that parses, a tool call's text comes as one
whole call in `Delta.calls` once its block closes, never as text.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from model.sampling import SamplingParams
from server.api.errors import APIError, bad_request, request_error, session_error
from server.api.reasoning import ThinkStream
from server.api.serving import ready_engine
from server.api.state import AppState
from server.api.tools import NO_TOOLS, ToolPlan
from server.async_engine import EngineDeadError, QueueFullError, ShutdownError, SlowReaderError
from server.engine import StepOutput
from server.engine.limits import RequestError
from server.engine.sessions import SessionError

log = logging.getLogger("workmem.api")
MERGE_BUFFER = 64  # outputs of a request's prompts waiting for its writer


@dataclass(frozen=True)
class GenerationSpec:
    """What an adapter asks the core to run: prompts[i] sampled with params[i] (n choices each)."""

    request_id: str
    prompts: list[list[int]]
    params: list[SamplingParams]
    tools: ToolPlan = NO_TOOLS
    session_id: str | None = None  # run as this session's turn (its KV resumed, its transcript extended)
    new_messages: list[dict] | None = None  # what the turn adds to the session's messages
    cache_salt: str | None = None
    single_call: bool = False  # parallel_tool_calls=false: calls after a choice's first are dropped
    thinking: bool | None = None  # a reasoning parser runs: whether the output starts inside <think>


@dataclass
class Choice:
    """One completion being assembled (its raw engine output, stop strings cut)."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    last_token_time: float | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass(frozen=True)
class Delta:
    """One engine output of one choice. `out` is the raw output (new token ids, text,
    logprobs); `reasoning` + `text` + `calls` are its text as the parsers split it, `calls`
    whole OpenAI tool calls {"index", "id", "type", "function": {"name", "arguments"}}.
    `finish_reason` is None until the choice's last Delta; "tool_calls" where the engine
    said "stop" and the choice called."""

    choice: Choice
    out: StepOutput
    reasoning: str
    text: str
    calls: list[dict]
    finish_reason: str | None


class OutputParser:
    """One choice's streamed text -> (reasoning, answer text, whole tool calls)."""

    def __init__(self, spec: GenerationSpec) -> None:
        self.think = ThinkStream(spec.thinking) if spec.thinking is not None else None
        self.splitter = spec.tools.splitter() if spec.tools.parse else None
        self.single_call = spec.single_call
        self.num_calls = 0  # calls passed on

    def feed(self, text: str, finished: bool) -> tuple[str, str, list[dict]]:
        reasoning, text = self.think.feed(text) if self.think else ("", text)
        if finished and self.think is not None:
            more, tail = self.think.flush()
            reasoning, text = reasoning + more, text + tail
        text, calls = self.splitter.feed(text) if self.splitter else (text, [])
        if finished and self.splitter is not None:
            tail, more = self.splitter.flush()
            text, calls = text + tail, calls + more
        if self.single_call:
            calls = calls[:max(0, 1 - self.num_calls)]
        self.num_calls += len(calls)
        return reasoning, text, calls


class Generation:
    """One request running in the engine (see the module doc)."""

    def __init__(self, state: AppState, spec: GenerationSpec) -> None:
        self.state, self.engine, self.spec = state, ready_engine(state), spec
        self.request_id = spec.request_id
        self.n = spec.params[0].n
        self.choices = [Choice(i) for i in range(len(spec.prompts) * self.n)]
        self.parsers = [OutputParser(spec) for _ in self.choices]
        self.prompt_logprobs: list[list | None] = [None] * len(spec.prompts)  # per prompt, once computed
        self.usage = Usage(prompt_tokens=sum(len(p) for p in spec.prompts))
        self.start_time = time.monotonic()
        self._pump: _Pump | None = None  # set by start()
        self._first: Delta | None = None
        self._closing: asyncio.Future | None = None  # the pump's close, once begun

    async def start(self) -> None:
        """Submit every prompt and wait for its first output: a refused request raises its
        APIError here, before the adapter answers anything."""
        self._pump = _Pump(*await self._submit())
        try:
            self._first = await self._next()
        except BaseException:
            await self.aclose()
            raise

    async def events(self) -> AsyncIterator[Delta]:
        """Every choice's Deltas, in arrival order (after `start`); closing it aborts the request."""
        try:
            item = self._first
            while item is not None:
                yield item
                item = await self._next()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Stop the request if it still runs (its engine requests aborted); idempotent. Closers
        may race: a client that leaves mid-write leaves the adapter's body and the generators
        under it to garbage collection, which closes each in a task of its own. The first
        closes the pump; the others wait for that."""
        if self._pump is None:
            return
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._pump.close())
        await asyncio.shield(self._closing)

    def cancel(self) -> None:
        """Abort the engine requests; each choice ends with finish_reason "abort"."""
        for i in range(len(self.spec.prompts)):
            self.engine.abort(f"{self.request_id}-{i}")

    async def run_to_end(self) -> list[Choice]:
        await self.start()
        async for _ in self.events():
            pass
        return self.choices

    async def _submit(self) -> tuple[list[AsyncIterator[StepOutput]], list[StepOutput]]:
        """Each prompt's engine stream and first output; a refusal closes them all and
        raises its APIError."""
        spec, streams, firsts = self.spec, [], []
        try:
            for i, (prompt, params) in enumerate(zip(spec.prompts, spec.params)):
                stream = self.engine.generate(f"{self.request_id}-{i}", prompt, params,
                                              spec.session_id, spec.new_messages, spec.cache_salt)
                streams.append(stream)
                firsts.append(await anext(stream))
        except Exception as exc:
            await _close_all(streams)
            refusal = self._refusal(exc)
            if refusal is exc:
                raise
            raise refusal from None
        except BaseException:
            await _close_all(streams)
            raise
        return streams, firsts

    def _refusal(self, exc: Exception) -> Exception:
        if isinstance(exc, SessionError):
            return session_error(exc)
        if isinstance(exc, RequestError):
            return request_error(exc)
        if isinstance(exc, ValueError):
            return bad_request(exc)
        if isinstance(exc, QueueFullError):
            return APIError(429, f"server busy: {exc}", code="queue_full",
                            headers={"Retry-After": str(self.state.settings.retry_after_s)})
        if isinstance(exc, EngineDeadError):
            return APIError(503, str(exc), code="engine_dead")
        return exc

    async def _next(self) -> Delta | None:
        """The next output of any prompt, recorded and parsed; None once all have ended."""
        item = await self._pump.next()
        if item is None:
            return None
        i, out = item
        _raise_failure(out)
        choice = self.choices[i * self.n + out.index]
        self._record(choice, out)
        return self._delta(choice, out)

    def _delta(self, choice: Choice, out: StepOutput) -> Delta:
        reasoning = text = ""
        calls: list[dict] = []
        parser = self.parsers[choice.index]
        if out.text or out.finished:
            reasoning, text, calls = parser.feed(out.text, out.finished)
        finish = out.finish_reason if out.finished else None
        if finish == "stop" and parser.num_calls:
            finish = "tool_calls"
        return Delta(choice, out, reasoning, text, calls, finish)

    def _record(self, choice: Choice, out: StepOutput) -> None:
        metrics, now = self.state.metrics, time.monotonic()
        if out.prompt_logprobs is not None:
            self.prompt_logprobs[choice.index // self.n] = out.prompt_logprobs
        if choice.last_token_time is None and not out.new_token_ids and out.finish_reason == "length":
            self._count_prompt(choice, out)  # max_tokens=0: the prompt alone was computed
        if out.new_token_ids:
            if choice.last_token_time is None:
                metrics.ttft.observe(now - self.start_time)
                metrics.queue_time.observe(out.queue_time)
                self._count_prompt(choice, out)
            else:
                metrics.itl.observe(now - choice.last_token_time)
            choice.last_token_time = now
            metrics.generation_tokens.inc(len(out.new_token_ids))
        choice.token_ids += out.new_token_ids
        choice.text += out.text
        if out.new_logprobs:
            choice.logprobs += out.new_logprobs
        self.usage.completion_tokens += len(out.new_token_ids)
        if out.finished:
            choice.finish_reason = out.finish_reason
            metrics.request_success.labels(finished_reason=out.finish_reason).inc()
            if all(c.finish_reason for c in self.choices):
                metrics.e2e.observe(now - self.start_time)
                log.info("request_id=%s event=finished prompt_tokens=%d completion_tokens=%d "
                         "cached_tokens=%d seconds=%.3f", self.request_id, self.usage.prompt_tokens,
                         self.usage.completion_tokens, self.usage.cached_tokens, now - self.start_time)

    def _count_prompt(self, choice: Choice, out: StepOutput) -> None:
        """A prompt's usage and prefix-cache counters, once (on its first choice's first output)."""
        if choice.index % self.n == 0:
            metrics = self.state.metrics
            self.usage.cached_tokens += out.num_cached_tokens
            metrics.prefix_queries.inc(out.num_prompt_tokens)
            metrics.prefix_hits.inc(out.num_cached_tokens)
            metrics.prompt_tokens.inc(out.num_prompt_tokens)


def _raise_failure(item: StepOutput | BaseException) -> None:
    """The APIError of a stream's failure (the engine's, or this request's alone)."""
    if isinstance(item, SlowReaderError):
        raise APIError(408, str(item), code="reader_too_slow")
    if isinstance(item, (ShutdownError, EngineDeadError)):
        raise APIError(503, str(item), code="server_shutting_down"
                       if isinstance(item, ShutdownError) else "engine_dead")
    if isinstance(item, BaseException):
        raise APIError(500, f"generation failed: {item}")
    if item.error is not None:  # the engine failed this request alone
        raise APIError(500, f"the request failed: {item.error}", code="request_failed")


class _Pump:
    """A request's engine streams (one per prompt) pumped into one bounded queue, in arrival
    order. A plain object rather than an async generator, so garbage collection never closes
    it behind Generation.aclose's back: `close` runs once."""

    def __init__(self, streams: list[AsyncIterator[StepOutput]], firsts: list[StepOutput]) -> None:
        self.streams = streams
        self.queue: asyncio.Queue = asyncio.Queue(MERGE_BUFFER)  # full: the backlog stays in the engine's queues
        self.remaining = len(streams)
        self.tasks = [asyncio.create_task(self._pump(i, s, f)) for i, (s, f) in enumerate(zip(streams, firsts))]

    async def _pump(self, i: int, stream: AsyncIterator[StepOutput], first: StepOutput) -> None:
        try:
            await self.queue.put((i, first))
            async for out in stream:
                await self.queue.put((i, out))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await self.queue.put((i, exc))
        finally:
            await self.queue.put((i, _ENDED))

    async def next(self) -> tuple[int, StepOutput | BaseException] | None:
        """(prompt index, its next output or failure); None once every stream has ended."""
        while self.remaining:
            i, item = await self.queue.get()
            if item is _ENDED:
                self.remaining -= 1
                continue
            return i, item
        return None

    async def close(self) -> None:
        """Stop the pumps and close the streams (each aborts its engine request if unfinished)."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await _close_all(self.streams)


_ENDED = object()  # a pump's last item


async def _close_all(streams: list) -> None:
    for stream in streams:
        await stream.aclose()
