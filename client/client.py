"""Synchronous workmem client (`Client`): the core's bodies, stream parser and retry policy
(client/core.py) around an httpx.Client."""
from __future__ import annotations

import time
from typing import Any, Iterator

import httpx

from client.core import (
    SESSIONS_PATH, ClientBase,
    Completion, Messages, SSEDecoder, StreamParser, Usage, auth_headers, chat_messages, connection_error,
    create_body, may_retry_transport, request_body, response_json,
)
from client.errors import WorkmemError, error_from_response
from client.sessions import Session

__all__ = ["Client", "Completion", "Messages", "SSEDecoder", "StreamParser", "Usage"]


class Client(ClientBase[httpx.Client], http=httpx.Client, sleep=time.sleep):
    """Blocking client for a workmem (OpenAI-compatible) server; its keywords are
    `ClientBase`'s."""

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
        retries = self.retries()
        while True:
            try:
                resp = self._http.send(self.build_request(path, body, stream, method), stream=stream)
            except httpx.TransportError as exc:
                self._sleep(retries.wait_after(connection_error(exc), may_retry_transport(exc, idempotent)))
                continue
            if resp.status_code < 400:
                return resp
            self._sleep(retries.wait_after(error_from_response(resp.status_code, _error_text(resp), resp.headers)))


def _error_text(resp: httpx.Response) -> str:
    """An error response's body ("" if it broke off); the response is closed."""
    try:
        resp.read()
        return resp.text
    except httpx.TransportError:
        return ""
    finally:
        resp.close()
