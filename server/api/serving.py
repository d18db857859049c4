"""What every adapter checks before the core runs a request: the engine serves the model
and the task, the text and max_tokens fit the context, the sampling fields are valid and
their logprobs bounded. Each check raises the APIError that says why (400 naming the field,
404 for another model, 503 while the engine is not ready)."""
from __future__ import annotations

import asyncio
from typing import Callable, TypeVar

from model.sampling import SamplingParams
from server.api.errors import APIError, bad_request, request_error
from server.api.state import AppState
from server.async_engine import AsyncEngine
from server.engine.limits import RequestError
from server.sampling_defaults import OPENAI_DEFAULTS, SamplingDefaults

T = TypeVar("T")


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
