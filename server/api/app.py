"""The FastAPI app: routes, error handlers, API keys, draining and body-size limits."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api import chat, completions, embeddings, messages, misc_routes, responses, session_routes
from server.api.errors import error_body, install_error_handlers
from server.api.openapi import install_openapi
from server.api.state import AppState, ServerSettings
from server.api.web import install_web_ui, is_page_path
from server.async_engine import AsyncEngine

OPEN_PATHS = ("/health",)  # answered without an API key (and while draining)
BODY_POLL_S = 0.25  # how often a request body still arriving looks for a drain


def create_app(
    settings: ServerSettings,
    engine: AsyncEngine | None = None,
    load: Callable[[], AsyncEngine] | None = None,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """An app serving `engine`, or one that builds it with `load` in the background at
    start-up (answering 503 until then; a failed load is logged and calls
    `on_load_failure(reason)`). An engine the app loaded is shut down on exit."""
    state = AppState(settings, engine=engine)
    owns_engine = engine is None

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if state.engine is None and load is not None:
            state.load_in_background(load, on_load_failure)
        yield
        if owns_engine and state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="workmem", version="0.1.0", lifespan=lifespan)
    app.state.workmem = state
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(session_routes.router)
    app.include_router(responses.router)
    app.include_router(messages.router)
    app.include_router(misc_routes.router)
    app.include_router(embeddings.router)
    if settings.web_ui:
        install_web_ui(app)
    app.add_middleware(LimitsMiddleware, settings=settings, state=state)
    if settings.cors_origins:  # outermost, so preflights and errors carry the headers too
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    return app


class LimitsMiddleware:
    """401 without a valid API key (when keys are set), 503 while draining, 413 for bodies
    over the limit. The matched key's fingerprint goes to `request.state.owner`."""

    def __init__(self, app: ASGIApp, settings: ServerSettings, state: AppState) -> None:
        self.app, self.settings, self.state = app, settings, state
        self.open_paths = OPEN_PATHS + (("/metrics",) if settings.metrics_public else ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]  # the error shape follows the route's protocol (errors.error_body)
        page = self.settings.web_ui and is_page_path(scope["path"])
        if scope["path"] not in self.open_paths and not page:
            if self.state.draining:
                return await _reject(send, 503, "the server is shutting down", "server_shutting_down",
                                     retry_after=self.settings.retry_after_s, path=path)
            if self.settings.api_keys:
                owner = key_owner(_bearer(headers), self.settings.api_keys)
                if owner is None:
                    return await _reject(send, 401, "invalid or missing API key", "invalid_api_key", path=path)
                scope.setdefault("state", {})["owner"] = owner
        limit = self.settings.max_request_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _reject(send, 413, f"request body is larger than {limit} bytes", "request_too_large",
                                 path=path)
        body, more = [], True
        deadline = asyncio.get_running_loop().time() + self.settings.body_timeout_s
        while more:  # buffer the body (bounded in size and time), then replay it to the app
            message = await self._next_body_message(receive, deadline)
            if message is None:
                if self.state.draining:
                    return await _reject(send, 503, "the server is shutting down", "server_shutting_down", path=path)
                return await _reject(send, 408, f"the request body did not arrive within "
                                                f"{self.settings.body_timeout_s:g} s", "request_timeout", path=path)
            if message["type"] != "http.request":
                return
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
            if sum(map(len, body)) > limit:
                return await _reject(send, 413, f"request body is larger than {limit} bytes", "request_too_large",
                                     path=path)
        replay = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def replay_receive():
            return replay.pop() if replay else await receive()

        await self.app(scope, replay_receive, send)


    async def _next_body_message(self, receive: Receive, deadline: float) -> dict | None:
        """The next ASGI message, or None at the body deadline or when draining starts
        (a client that never finishes its body must not hold a shutdown)."""
        pending = asyncio.ensure_future(receive())
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.wait({pending}, timeout=max(0.0, min(deadline - loop.time(), BODY_POLL_S)))
            if pending.done():
                return pending.result()
            if loop.time() >= deadline or self.state.draining:
                pending.cancel()
                return None


def _bearer(headers: dict[str, str]) -> str:
    given = headers.get("authorization", "")
    return given[7:] if given.lower().startswith("bearer ") else headers.get("x-api-key", "")


def key_owner(token: str, keys: tuple[str, ...]) -> str | None:
    """The fingerprint of the key `token` matches (every key compared in constant time), or
    None. Sessions record the fingerprint, never the key."""
    found = None
    for key in keys:
        if hmac.compare_digest(token.encode(), key.encode()):
            found = key
    return None if found is None else "key_" + hashlib.sha256(found.encode()).hexdigest()[:16]


async def _reject(send: Send, status: int, message: str, code: str, retry_after: int | None = None,
                  path: str = "") -> None:
    body = json.dumps(error_body(status, message, code=code, path=path)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
