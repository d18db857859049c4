"""The clients' shared core, without I/O: result types, request bodies (completions, chat,
sessions), the SSE stream parser and the retry policy. `Client` (blocking) and
`AsyncClient` (asyncio) wrap it around httpx; `client.sessions` builds on the `Transport`
doors every client has (`request`, `stream_events`), so it needs neither client module.

Retries: 429, 503 and transport failures are retried up to `max_retries` times, waiting
the server's Retry-After when sent, else `backoff * 2**attempt`, each wait capped at
MAX_RETRY_WAIT_S. Other errors are raised at once. A stream is retried only while it is
being opened (before its 200 status line); once open, a failure is raised to the caller.
A non-idempotent request (one that changes a server-side session) is retried after a
transport failure only when the request provably never left (connect/pool errors).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Generic, Protocol, TypeVar
from urllib.parse import quote

import httpx

from client.errors import (
    APIConnectionError, APITimeoutError, RateLimitError, ServiceUnavailableError, WorkmemError,
    error_from_payload,
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


class Retries:
    """One request's attempts under the retry policy (module doc)."""

    def __init__(self, max_retries: int, backoff: float) -> None:
        self.max_retries, self.backoff, self.attempt = max_retries, backoff, 0

    def wait_after(self, err: WorkmemError, retryable: bool = True) -> float:
        """Seconds to wait before the next attempt after `err`; raises `err` when there is none."""
        delay = retry_delay(err, self.attempt, self.backoff) if retryable and self.attempt < self.max_retries else None
        if delay is None:
            raise err
        self.attempt += 1
        return delay


HTTP = TypeVar("HTTP", httpx.Client, httpx.AsyncClient)


class ClientBase(Generic[HTTP]):
    """What `Client` and `AsyncClient` share: settings, request building, retries.

    `model` defaults to the first id of GET /v1/models, fetched once on first use; a
    `model=` keyword on a call overrides it. Other keywords (max_tokens, temperature, stop,
    ...) go into the body. `http_client` (default: a new one with `timeout`, closed with
    the client) and `sleep` (waits between retries; tests pass one that records the waits)
    are the subclass's kind: blocking or asyncio (named where it is declared)."""

    _http_type: type
    _default_sleep: Callable[[float], Any]

    def __init__(
        self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S, max_retries: int = DEFAULT_MAX_RETRIES,
        backoff: float = DEFAULT_BACKOFF_S, model: str | None = None,
        http_client: HTTP | None = None, sleep: Callable[[float], Any] | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.api_key, self.max_retries, self.backoff, self.model = api_key, max_retries, backoff, model
        self._owns_http = http_client is None
        self._http: HTTP = http_client or self._http_type(timeout=timeout)
        self._sleep = sleep or self._default_sleep

    def __init_subclass__(cls, http: type | None = None, sleep: Callable[[float], Any] | None = None,
                          **kwargs: Any) -> None:
        """`class Client(ClientBase[httpx.Client], http=httpx.Client, sleep=time.sleep)`."""
        super().__init_subclass__(**kwargs)
        if http is not None:
            cls._http_type = http
        if sleep is not None:
            cls._default_sleep = staticmethod(sleep)

    def build_request(self, path: str, body: dict[str, Any] | None, stream: bool, method: str | None) -> httpx.Request:
        """`method` (default: POST `body`, GET when None) to `path`, with the auth headers."""
        return self._http.build_request(method or ("GET" if body is None else "POST"), self.base_url + path, json=body,
                                        headers=auth_headers(self.api_key, stream))

    def retries(self) -> Retries:
        return Retries(self.max_retries, self.backoff)


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


def session_path(session_id: str, suffix: str = "") -> str:
    return f"{SESSIONS_PATH}/{quote(session_id, safe='')}{suffix}"


def create_body(
    model: str | None, system: str | None, ttl_seconds: float | None, messages: Messages | None,
    metadata: dict[str, Any] | None, overflow: str | None,
) -> dict[str, Any]:
    """POST /v1/sessions body; unset fields are left to the server's defaults."""
    initial = ([{"role": "system", "content": system}] if system else []) + list(messages or [])
    body = {"model": model, "messages": initial or None, "ttl_seconds": ttl_seconds,
            "metadata": metadata, "overflow": overflow}
    return {k: v for k, v in body.items() if v is not None}


def turn_body(default_model: str | None, messages: Messages | str, params: dict[str, Any], stream: bool) -> dict[str, Any]:
    """A turn's chat-completions body: only the new messages; `model` only when known
    (the session already has one, so no GET /v1/models round trip)."""
    model = params.pop("model", None) or default_model
    body = request_body(model or "", "messages", chat_messages(messages), params, stream)
    if not model:
        del body["model"]
    return body


def fork_body(ttl_seconds: float | None, num_turns: int | None = None) -> dict[str, Any]:
    body = {"ttl_seconds": ttl_seconds, "num_turns": num_turns}
    return {k: v for k, v in body.items() if v is not None}


class Transport(Protocol):
    """What a session handle needs from its client (both clients have these doors):
    `request(path, body=None, method=None, idempotent=True)` -> a < 400 response (awaitable
    for AsyncClient), `stream_events(path, body, chat, idempotent)` -> text deltas then a
    Usage (an async iterator for AsyncClient), and the default `model`."""

    model: str | None

    def request(self, path: str, body: dict[str, Any] | None = None, method: str | None = None,
                idempotent: bool = True) -> Any: ...

    def stream_events(self, path: str, body: dict[str, Any], chat: bool, idempotent: bool = True) -> Any: ...

