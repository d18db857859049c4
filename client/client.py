"""Synchronous workmem client (`Client`): the core's bodies, stream parser and retry policy
(client/core.py) around an httpx.Client."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import httpx

from client.core import (
    DEFAULT_BACKOFF_S, DEFAULT_BASE_URL, DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT_S, SESSIONS_PATH, Completion,
    Messages, SSEDecoder, StreamParser, Usage, auth_headers, chat_messages, connection_error, create_body,
    may_retry_transport, normalize_base_url, request_body, response_json, retry_delay,
)
from client.errors import WorkmemError, error_from_response
from client.sessions import Session

__all__ = ["Client", "Completion", "Messages", "SSEDecoder", "StreamParser", "Usage"]


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
        return Completion.from_response(response_json(self.request("/v1/completions", body)), chat=False)

    def chat(self, messages: Messages | str, **params: Any) -> Completion:
        body = request_body(self._model_for(params), "messages", chat_messages(messages), params, stream=False)
        return Completion.from_response(response_json(self.request("/v1/chat/completions", body)), chat=True)

    def stream_complete(self, prompt: str | list[int], **params: Any) -> Iterator[str | Usage]:
        """Text deltas as they arrive, then the request's Usage."""
        body = request_body(self._model_for(params), "prompt", prompt, params, stream=True)
        yield from self.stream_events("/v1/completions", body, chat=False)

    def stream_chat(self, messages: Messages | str, **params: Any) -> Iterator[str | Usage]:
        """Assistant text deltas as they arrive, then the request's Usage."""
        body = request_body(self._model_for(params), "messages", chat_messages(messages), params, stream=True)
        yield from self.stream_events("/v1/chat/completions", body, chat=True)

    def create_session(
        self, system: str | None = None, ttl_seconds: float | None = None, messages: Messages | None = None,
        metadata: dict[str, Any] | None = None, overflow: str | None = None,
    ) -> Session:
        """A new server-side session (see client.sessions); `system` becomes its first message."""
        body = create_body(self.model, system, ttl_seconds, messages, metadata, overflow)
        data = response_json(self.request(SESSIONS_PATH, body, idempotent=False))
        return Session(self, data["id"], data)

    def session(self, session_id: str) -> Session:
        """Handle on an existing session (e.g. to resume it); makes no request."""
        return Session(self, session_id)

    def list_sessions(self) -> list[dict[str, Any]]:
        return response_json(self.request(SESSIONS_PATH)).get("data", [])

    def models(self) -> list[str]:
        return [m["id"] for m in response_json(self.request("/v1/models")).get("data", [])]

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

    def stream_events(self, path: str, body: dict[str, Any], chat: bool, idempotent: bool = True) -> Iterator[str | Usage]:
        resp = self.request(path, body, stream=True, idempotent=idempotent)
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

    def request(
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
