"""Generation for the OpenAI routes: prompts -> engine -> choices, streamed or whole.

A request with P prompts and n completions each has P*n choices, indexed
`prompt_index * n + completion_index`, as OpenAI does. Each prompt is one engine request
(`{request_id}-{prompt_index}`); closing the stream aborts all of them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, TypeVar

from model.sampling import SamplingParams
from server.api.errors import APIError, bad_request, request_error
from server.api.state import AppState
from server.async_engine import AsyncEngine, EngineDeadError, QueueFullError, ShutdownError, SlowReaderError
from server.engine import StepOutput
from server.engine.limits import RequestError
from server.engine.sessions import SessionError
from server.sampling_defaults import OPENAI_DEFAULTS, SamplingDefaults

log = logging.getLogger("workmem.api")
T = TypeVar("T")


@dataclass
class Choice:
    """One completion being assembled."""

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


def ready_engine(state: AppState, task: str = "generate") -> AsyncEngine:
    """The loaded engine, if it serves `task` ("generate", or "embed": an encoder model's
    AsyncEmbedder); 400 naming the model's task otherwise, 503 while it is not running."""
    if state.engine is None:
        message = f"model failed to load: {state.load_error}" if state.load_error else "model is loading"
        raise APIError(503, message, code="not_ready", headers={"Retry-After": "1"})
    served = getattr(state.engine, "task", "generate")
    if served != task:
        raise APIError(400, f"model {state.settings.served_model_name!r} serves task {served!r}: "
                       f"{TASK_ROUTES[served]} only", code="unsupported_task")
    if not state.engine.is_alive:
        raise APIError(503, "the engine is not running", code="engine_dead")
    return state.engine


TASK_ROUTES = {"generate": "completions, chat, sessions, Responses and Messages",
               "embed": "/v1/embeddings"}  # what a model of each task answers


def check_model(state: AppState, model: str | None) -> None:
    if model is not None and model != state.settings.served_model_name:
        raise APIError(404, f"model {model!r} does not exist; this server serves "
                       f"{state.settings.served_model_name!r}", param="model", code="model_not_found")


def serving_engine(state: AppState, model: str | None) -> AsyncEngine:
    """The engine for a request naming `model`: 404 for another model, 503 when not ready."""
    check_model(state, model)
    return ready_engine(state)


def fit_max_tokens(engine: AsyncEngine, prompt_len: int, requested: int | None, default: int | None,
                   cap: int | None = None, prompt_param: str = "messages") -> int:
    """The request's max_tokens (`default` when it gives none), checked against `cap`
    (--max-tokens-limit, this server's) and the context (the engine's rule); 400 with the numbers."""
    if requested is not None and cap is not None and requested > cap:
        raise APIError(400, f"max_tokens={requested} is over this server's limit of {cap}", param="max_tokens")
    try:
        return engine.limits.fit_max_tokens(prompt_len, requested, default, prompt_param)
    except RequestError as exc:
        raise request_error(exc) from None


def check_text_fits(engine: AsyncEngine, texts: list[str], param: str) -> None:
    """400 before tokenizing (cheap, on the event loop) when the text alone cannot fit the
    context (the engine's rule: `RequestLimits.check_text`)."""
    try:
        engine.limits.check_text(texts, param)
    except RequestError as exc:
        raise request_error(exc) from None


async def off_loop(fn: Callable[..., T], *args) -> T:
    """Tokenizing and template rendering run in a worker thread, so a large input never
    stalls /health or other streams; ValueErrors come back as they are."""
    return await asyncio.to_thread(fn, *args)


SESSION_ERROR_STATUS = {"session_not_found": 404, "session_busy": 409, "too_many_sessions": 429,
                        "session_exists": 409, "session_corrupt": 422}


def session_error(exc: SessionError) -> APIError:
    return APIError(SESSION_ERROR_STATUS.get(exc.code, 400), str(exc), code=exc.code)


MERGE_BUFFER = 64  # outputs of a request's prompts waiting for its writer
MAX_LOGPROB_VALUES = 200_000  # logprob values in one prompt's choices (n x tokens x (k + 1)): bounds the response


def make_params(body, max_tokens: int, logprobs: int | None, defaults: SamplingDefaults = OPENAI_DEFAULTS,
                prompt_len: int = 0, prompt_values: int = 0) -> SamplingParams:
    """The body's SamplingParams (400 naming the field when invalid); `defaults` (the
    server's) fill its absent sampling fields. `prompt_values` are the logprob values each
    choice lists per prompt token (echo, prompt_logprobs), scored for `body.prompt_scores`
    alternatives."""
    prompt_logprobs = getattr(body, "prompt_scores", None)
    try:
        params = body.sampling_params(max_tokens, logprobs, defaults, prompt_logprobs)
    except ValueError as exc:
        raise bad_request(exc) from None
    per_choice = max_tokens * (logprobs + 1 if logprobs is not None else 0) + prompt_len * prompt_values
    if params.n * per_choice > MAX_LOGPROB_VALUES:
        raise APIError(400, f"n={params.n} x ({max_tokens} generated + {prompt_len} prompt tokens) of logprobs "
                       f"is {params.n * per_choice} values, over this server's {MAX_LOGPROB_VALUES} per prompt; "
                       f"ask for fewer tokens or alternatives", param="logprobs")
    return params


class Generation:
    """Runs a request's prompts in the engine and yields (choice index, StepOutput)."""

    def __init__(self, state: AppState, request_id: str, prompts: list[list[int]], params: list[SamplingParams],
                 session_id: str | None = None, new_messages: list[dict] | None = None,
                 cache_salt: str | None = None):
        self.state, self.engine = state, ready_engine(state)
        self.session_id, self.new_messages, self.cache_salt = session_id, new_messages, cache_salt
        self.request_id, self.prompts, self.params = request_id, prompts, params
        self.n = params[0].n
        self.choices = [Choice(i) for i in range(len(prompts) * self.n)]
        self.prompt_logprobs: list[list | None] = [None] * len(prompts)  # per prompt, once computed
        self.usage = Usage(prompt_tokens=sum(len(p) for p in prompts))
        self.start = time.monotonic()

    async def start_streams(self) -> list[AsyncIterator[StepOutput]]:
        """Submit every prompt and wait for its first event, so that a rejected request
        fails before any response bytes are sent. Returns the live streams."""
        streams, firsts = [], []
        try:
            for i, (prompt, params) in enumerate(zip(self.prompts, self.params)):
                stream = self.engine.generate(f"{self.request_id}-{i}", prompt, params,
                                              self.session_id, self.new_messages, self.cache_salt)
                streams.append(stream)
                firsts.append(await anext(stream))
        except SessionError as exc:
            await _close_all(streams)
            raise session_error(exc) from None
        except RequestError as exc:
            await _close_all(streams)
            raise request_error(exc) from None
        except ValueError as exc:
            await _close_all(streams)
            raise bad_request(exc) from None
        except QueueFullError as exc:
            await _close_all(streams)
            raise APIError(429, f"server busy: {exc}", code="queue_full",
                           headers={"Retry-After": str(self.state.settings.retry_after_s)}) from None
        except EngineDeadError as exc:
            await _close_all(streams)
            raise APIError(503, str(exc), code="engine_dead") from None
        except BaseException:
            await _close_all(streams)
            raise
        self._firsts = firsts
        return streams

    async def events(self) -> AsyncIterator[tuple[Choice, StepOutput]]:
        """All prompts' outputs, merged; records metrics; closing it aborts everything."""
        streams = await self.start_streams()
        merged: asyncio.Queue = asyncio.Queue(MERGE_BUFFER)  # full: the backlog stays in the engine's bounded queues
        done = object()

        async def pump(i: int, stream: AsyncIterator[StepOutput]) -> None:
            try:
                await merged.put((i, self._firsts[i]))
                async for out in stream:
                    await merged.put((i, out))
            except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
                await merged.put((i, exc))
            finally:
                await merged.put((i, done))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        remaining = len(tasks)
        try:
            while remaining:
                i, item = await merged.get()
                if item is done:
                    remaining -= 1
                    continue
                if isinstance(item, SlowReaderError):
                    raise APIError(408, str(item), code="reader_too_slow")
                if isinstance(item, (ShutdownError, EngineDeadError)):
                    raise APIError(503, str(item), code="server_shutting_down"
                                   if isinstance(item, ShutdownError) else "engine_dead")
                if isinstance(item, BaseException):
                    raise APIError(500, f"generation failed: {item}")
                if item.error is not None:  # the engine failed this request alone
                    raise APIError(500, f"the request failed: {item.error}", code="request_failed")
                choice = self.choices[i * self.n + item.index]
                self._record(choice, item)
                yield choice, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await _close_all(streams)

    def _record(self, choice: Choice, out: StepOutput) -> None:
        metrics, now = self.state.metrics, time.monotonic()
        if out.prompt_logprobs is not None:
            self.prompt_logprobs[choice.index // self.n] = out.prompt_logprobs
        if choice.last_token_time is None and not out.new_token_ids and out.finish_reason == "length":
            self._count_prompt(choice, out)  # max_tokens=0: the prompt alone was computed
        if out.new_token_ids:
            if choice.last_token_time is None:
                metrics.ttft.observe(now - self.start)
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
                metrics.e2e.observe(now - self.start)
                log.info("request_id=%s event=finished prompt_tokens=%d completion_tokens=%d "
                         "cached_tokens=%d seconds=%.3f", self.request_id, self.usage.prompt_tokens,
                         self.usage.completion_tokens, self.usage.cached_tokens, now - self.start)

    def _count_prompt(self, choice: Choice, out: StepOutput) -> None:
        """A prompt's usage and prefix-cache counters, once (on its first choice's first output)."""
        if choice.index % self.n == 0:
            metrics = self.state.metrics
            self.usage.cached_tokens += out.num_cached_tokens
            metrics.prefix_queries.inc(out.num_prompt_tokens)
            metrics.prefix_hits.inc(out.num_cached_tokens)
            metrics.prompt_tokens.inc(out.num_prompt_tokens)

    async def run_to_end(self) -> list[Choice]:
        async for _ in self.events():
            pass
        return self.choices


async def _close_all(streams: list) -> None:
    for stream in streams:
        await stream.aclose()
