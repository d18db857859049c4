"""Asynchronous workmem client: `Client`'s API with coroutines and async iterators.

Same bodies, stream parsing and retry policy as `Client` (client/core.py).
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import httpx

from client.core import (
    SESSIONS_PATH, ClientBase,
    Completion, Messages, StreamParser, Usage, auth_headers, chat_messages, connection_error, create_body,
    may_retry_transport, request_body, response_json,
)
from client.errors import WorkmemError, error_from_response
from client.sessions import AsyncSession


class AsyncClient(ClientBase[httpx.AsyncClient], http=httpx.AsyncClient, sleep=asyncio.sleep):
    """Non-blocking client for a workmem (OpenAI-compatible) server; its keywords are
    `ClientBase`'s."""

    async def complete(self, prompt: str | list[int], **params: Any) -> Completion:
        body = request_body(await self._model_for(params), "prompt", prompt, params, stream=False)
        return Completion.from_response(response_json(await self.request("/v1/completions", body)), chat=False)

    async def chat(self, messages: Messages | str, **params: Any) -> Completion:
        body = request_body(await self._model_for(params), "messages", chat_messages(messages), params, stream=False)
        return Completion.from_response(response_json(await self.request("/v1/chat/completions", body)), chat=True)

    async def stream_complete(self, prompt: str | list[int], **params: Any) -> AsyncIterator[str | Usage]:
        """Text deltas as they arrive, then the request's Usage."""
        body = request_body(await self._model_for(params), "prompt", prompt, params, stream=True)
        async for item in self.stream_events("/v1/completions", body, chat=False):
            yield item

    async def stream_chat(self, messages: Messages | str, **params: Any) -> AsyncIterator[str | Usage]:
        """Assistant text deltas as they arrive, then the request's Usage."""
        body = request_body(await self._model_for(params), "messages", chat_messages(messages), params, stream=True)
        async for item in self.stream_events("/v1/chat/completions", body, chat=True):
            yield item

    async def create_session(
        self, system: str | None = None, ttl_seconds: float | None = None, messages: Messages | None = None,
        metadata: dict[str, Any] | None = None, overflow: str | None = None,
    ) -> AsyncSession:
        """A new server-side session (see client.sessions); `system` becomes its first message."""
        body = create_body(self.model, system, ttl_seconds, messages, metadata, overflow)
        data = response_json(await self.request(SESSIONS_PATH, body, idempotent=False))
        return AsyncSession(self, data["id"], data)

    def session(self, session_id: str) -> AsyncSession:
        """Handle on an existing session (e.g. to resume it); makes no request."""
        return AsyncSession(self, session_id)

    async def list_sessions(self) -> list[dict[str, Any]]:
        return response_json(await self.request(SESSIONS_PATH)).get("data", [])

    async def models(self) -> list[str]:
        return [m["id"] for m in response_json(await self.request("/v1/models")).get("data", [])]

    async def health(self) -> bool:
        """True iff GET /health answers 200; never retries, never raises."""
        try:
            resp = await self._http.get(self.base_url + "/health", headers=auth_headers(self.api_key))
        except httpx.TransportError:
            return False
        return resp.status_code == 200

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    aclose = close

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _model_for(self, params: dict[str, Any]) -> str:
        model = params.pop("model", None) or self.model
        if model is None:
            ids = await self.models()
            if not ids:
                raise WorkmemError("the server lists no models")
            model = self.model = ids[0]
        return model

    async def stream_events(
        self, path: str, body: dict[str, Any], chat: bool, idempotent: bool = True,
    ) -> AsyncIterator[str | Usage]:
        resp = await self.request(path, body, stream=True, idempotent=idempotent)
        parser = StreamParser(chat)
        try:
            async for line in resp.aiter_lines():
                for item in parser.feed(line):
                    yield item
                if parser.done:
                    break
            for item in parser.finish():
                yield item
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        finally:
            await resp.aclose()

    async def request(
        self, path: str, body: dict[str, Any] | None = None, stream: bool = False,
        method: str | None = None, idempotent: bool = True,
    ) -> httpx.Response:
        """`method` (default: POST `body`, GET when None) with retries; returns a < 400 response."""
        retries = self.retries()
        while True:
            try:
                resp = await self._http.send(self.build_request(path, body, stream, method), stream=stream)
            except httpx.TransportError as exc:
                await self._sleep(retries.wait_after(connection_error(exc), may_retry_transport(exc, idempotent)))
                continue
            if resp.status_code < 400:
                return resp
            text = await _error_text(resp)
            await self._sleep(retries.wait_after(error_from_response(resp.status_code, text, resp.headers)))


async def _error_text(resp: httpx.Response) -> str:
    """An error response's body ("" if it broke off); the response is closed."""
    try:
        await resp.aread()
        return resp.text
    except httpx.TransportError:
        return ""
    finally:
        await resp.aclose()
