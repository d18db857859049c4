"""Synchronous workmem client, plus the pieces `AsyncClient` shares with it: result types,
request bodies, the SSE stream parser and the retry policy.

Retries: 429, 503 and transport failures are retried up to `max_retries` times, waiting
the server's Retry-After when sent, else `backoff * 2**attempt`, each wait capped at
MAX_RETRY_WAIT_S. Other errors are raised at once. A stream is retried only while it is
being opened (before its 200 status line); once open, a failure is raised to the caller.
A non-idempotent request (one that changes a server-side session) is retried after a
transport failure only when the request provably never left (connect/pool errors).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import httpx

from client.errors import (
    APIConnectionError, APITimeoutError, RateLimitError, ServiceUnavailableError, WorkmemError,
    error_from_payload, error_from_response,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAX_RETRIES = 3
DEFAULT_BACKOFF_S = 0.5
MAX_RETRY_WAIT_S = 60.0  # cap on one wait, whether from Retry-After or from backoff
USER_AGENT = "workmem-client/0.1"
SSE_DONE = "[DONE]"
SESSIONS_PATH = "/v1/sessions"

Messages = list[dict[str, Any]]

if TYPE_CHECKING:
    from client.sessions import Session


@dataclass(frozen=True)
class Usage:
    """Token counts of one request; `cached_tokens` were served by the prefix cache."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Usage:
        details = d.get("prompt_tokens_details") or {}
        return cls(
            int(d.get("prompt_tokens") or 0), int(d.get("completion_tokens") or 0),
            int(d.get("total_tokens") or 0), int(details.get("cached_tokens") or 0),
        )


@dataclass(frozen=True)
class Completion:
    """First choice of a non-streaming response; `raw` is the whole response JSON."""

    text: str
    finish_reason: str | None
    usage: Usage | None
    raw: dict[str, Any]

    @classmethod
    def from_response(cls, raw: dict[str, Any], chat: bool) -> Completion:
        choice = (raw.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
        usage = Usage.from_dict(raw["usage"]) if raw.get("usage") else None
        return cls(text or "", choice.get("finish_reason"), usage, raw)


def chat_messages(messages: Messages | str) -> Messages:
    """A bare string is one user message."""
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)


def request_body(model: str, key: str, value: Any, params: dict[str, Any], stream: bool) -> dict[str, Any]:
    """{"model", key: value, **params}; streams ask for the final usage chunk."""
    if "stream" in params:
        raise TypeError("pass no `stream`; use stream_complete / stream_chat to stream")
    body = {"model": model, key: value, **params}
    if stream:
        body["stream"] = True
        body["stream_options"] = {**(params.get("stream_options") or {}), "include_usage": True}
    return body


def normalize_base_url(base_url: str) -> str:
    """Server root without a trailing slash; a trailing /v1 is tolerated and dropped."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def auth_headers(api_key: str | None, stream: bool = False) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": "text/event-stream" if stream else "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def connection_error(exc: httpx.TransportError) -> APIConnectionError:
    cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
    return cls(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def may_retry_transport(exc: httpx.TransportError, idempotent: bool) -> bool:
    """A non-idempotent request is retried only if it never reached the server."""
    return idempotent or isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))


def retry_delay(err: WorkmemError, attempt: int, backoff: float) -> float | None:
    """Seconds to wait before retry number `attempt` (0-based), or None: do not retry."""
    if not isinstance(err, (RateLimitError, ServiceUnavailableError, APIConnectionError)):
        return None
    wait = err.retry_after if err.retry_after is not None else backoff * 2**attempt
    return min(wait, MAX_RETRY_WAIT_S)


def response_json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError as exc:
        raise WorkmemError(f"response is not JSON: {resp.text[:200]!r}", resp.status_code) from exc


class SSEDecoder:
    """Server-Sent Events framing: feed lines (without line endings); returns the `data`
    of an event when its terminating blank line arrives. Comments (`:` keep-alives) and
    fields other than `data` are ignored; multi-line data is joined with newlines."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        data, self._data = self._data, []
        return "\n".join(data) if data else None


class StreamParser:
    """OpenAI stream -> items: text deltas of choice 0 (chat `delta.content` or completion
    `text`) and a `Usage` when a chunk carries usage. `done` turns True at `data: [DONE]`;
    an `{"error": ...}` event raises the matching WorkmemError."""

    def __init__(self, chat: bool) -> None:
        self.chat, self.done = chat, False
        self._sse = SSEDecoder()

    def feed(self, line: str) -> list[str | Usage]:
        data = None if self.done else self._sse.feed(line)
        return [] if data is None else self._event(data)

    def finish(self) -> list[str | Usage]:
        """Call at end of body: flushes an unterminated event; raises if [DONE] never came."""
        data = None if self.done else self._sse.flush()
        items = [] if data is None else self._event(data)
        if not self.done:
            raise APIConnectionError(f"stream ended before `data: {SSE_DONE}`")
        return items

    def _event(self, data: str) -> list[str | Usage]:
        if data.strip() == SSE_DONE:
            self.done = True
            return []
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise WorkmemError(f"malformed stream event: {data[:200]!r}") from exc
        if not isinstance(chunk, dict):
            raise WorkmemError(f"malformed stream event: {data[:200]!r}")
        if "error" in chunk:
            raise error_from_payload(chunk)
        items: list[str | Usage] = []
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) == 0:
                text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
                if text:
                    items.append(text)
        if chunk.get("usage"):
            items.append(Usage.from_dict(chunk["usage"]))
        return items


class Client:
    """Blocking client for a workmem (OpenAI-compatible) server. `model` defaults to the
    first id of GET /v1/models, fetched once on first use; a `model=` keyword on a call
    overrides it. Other keywords (max_tokens, temperature, stop, ...) go into the body."""

    def __init__(
        self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S, max_retries: int = DEFAULT_MAX_RETRIES,
        backoff: float = DEFAULT_BACKOFF_S, model: str | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.api_key, self.max_retries, self.backoff, self.model = api_key, max_retries, backoff, model
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)
        self._sleep: Callable[[float], None] = time.sleep

    def complete(self, prompt: str | list[int], **params: Any) -> Completion:
        body = request_body(self._model_for(params), "prompt", prompt, params, stream=False)
        return Completion.from_response(response_json(self._send("/v1/completions", body)), chat=False)

    def chat(self, messages: Messages | str, **params: Any) -> Completion:
        body = request_body(self._model_for(params), "messages", chat_messages(messages), params, stream=False)
        return Completion.from_response(response_json(self._send("/v1/chat/completions", body)), chat=True)

    def stream_complete(self, prompt: str | list[int], **params: Any) -> Iterator[str | Usage]:
        """Text deltas as they arrive, then the request's Usage."""
        body = request_body(self._model_for(params), "prompt", prompt, params, stream=True)
        yield from self._stream("/v1/completions", body, chat=False)

    def stream_chat(self, messages: Messages | str, **params: Any) -> Iterator[str | Usage]:
        """Assistant text deltas as they arrive, then the request's Usage."""
        body = request_body(self._model_for(params), "messages", chat_messages(messages), params, stream=True)
        yield from self._stream("/v1/chat/completions", body, chat=True)

    def create_session(
        self, system: str | None = None, ttl_seconds: float | None = None, messages: Messages | None = None,
        metadata: dict[str, Any] | None = None, overflow: str | None = None,
    ) -> Session:
        """A new server-side session (see client.sessions); `system` becomes its first message."""
        from client.sessions import Session, create_body  # sessions.py builds on this module

        body = create_body(self.model, system, ttl_seconds, messages, metadata, overflow)
        data = response_json(self._send(SESSIONS_PATH, body, idempotent=False))
        return Session(self, data["id"], data)

    def session(self, session_id: str) -> Session:
        """Handle on an existing session (e.g. to resume it); makes no request."""
        from client.sessions import Session

        return Session(self, session_id)

    def list_sessions(self) -> list[dict[str, Any]]:
        return response_json(self._send(SESSIONS_PATH)).get("data", [])

    def models(self) -> list[str]:
        return [m["id"] for m in response_json(self._send("/v1/models")).get("data", [])]

    def health(self) -> bool:
        """True iff GET /health answers 200; never retries, never raises."""
        try:
            return self._http.get(self.base_url + "/health", headers=auth_headers(self.api_key)).status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _model_for(self, params: dict[str, Any]) -> str:
        model = params.pop("model", None) or self.model
        if model is None:
            ids = self.models()
            if not ids:
                raise WorkmemError("the server lists no models")
            model = self.model = ids[0]
        return model

    def _stream(self, path: str, body: dict[str, Any], chat: bool, idempotent: bool = True) -> Iterator[str | Usage]:
        resp = self._send(path, body, stream=True, idempotent=idempotent)
        parser = StreamParser(chat)
        try:
            for line in resp.iter_lines():
                yield from parser.feed(line)
                if parser.done:
                    break
            yield from parser.finish()
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        finally:
            resp.close()

    def _send(
        self, path: str, body: dict[str, Any] | None = None, stream: bool = False,
        method: str | None = None, idempotent: bool = True,
    ) -> httpx.Response:
        """`method` (default: POST `body`, GET when None) with retries; returns a < 400 response."""
        attempt = 0
        while True:
            request = self._http.build_request(
                method or ("GET" if body is None else "POST"), self.base_url + path, json=body,
                headers=auth_headers(self.api_key, stream),
            )
            retryable = True
            try:
                resp = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                err: WorkmemError = connection_error(exc)
                retryable = may_retry_transport(exc, idempotent)
            else:
                if resp.status_code < 400:
                    return resp
                try:
                    resp.read()
                    text = resp.text
                except httpx.TransportError:
                    text = ""
                finally:
                    resp.close()
                err = error_from_response(resp.status_code, text, resp.headers)
            delay = retry_delay(err, attempt, self.backoff) if retryable and attempt < self.max_retries else None
            if delay is None:
                raise err
            self._sleep(delay)
            attempt += 1
