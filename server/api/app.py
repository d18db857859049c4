"""The FastAPI app: routes, error handlers, API-key and body-size limits."""
from __future__ import annotations

import hmac
import json
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api import misc_routes, openai_routes, session_routes
from server.api.errors import error_body, install_error_handlers
from server.api.state import AppState, ServerSettings
from server.async_engine import AsyncEngine

OPEN_PATHS = ("/health", "/metrics", "/version", "/docs", "/openapi.json", "/redoc")


def create_app(
    settings: ServerSettings,
    engine: AsyncEngine | None = None,
    load: Callable[[], AsyncEngine] | None = None,
) -> FastAPI:
    """An app serving `engine`, or one that builds it with `load` in the background at
    start-up (answering 503 until then). An engine the app loaded is shut down on exit."""
    state = AppState(settings, engine=engine)
    owns_engine = engine is None

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if state.engine is None and load is not None:
            state.load_in_background(load)
        yield
        if owns_engine and state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="workmem", version="0.1.0", lifespan=lifespan)
    app.state.workmem = state
    install_error_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(session_routes.router)
    app.include_router(misc_routes.router)
    app.add_middleware(LimitsMiddleware, settings=settings)
    return app


class LimitsMiddleware:
    """401 without the API key (when one is set), 413 for bodies over the limit."""

    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode(errors="replace") for k, v in scope["headers"]}
        if self.settings.api_key and not scope["path"].startswith(OPEN_PATHS):
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode(), self.settings.api_key.encode()):
                return await _reject(send, 401, "invalid or missing API key", "invalid_api_key")
        limit = self.settings.max_request_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _reject(send, 413, f"request body is larger than {limit} bytes", "request_too_large")
        body, more = [], True
        while more:  # buffer the body (bounded by the limit), then replay it to the app
            message = await receive()
            if message["type"] != "http.request":
                return
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
            if sum(map(len, body)) > limit:
                return await _reject(send, 413, f"request body is larger than {limit} bytes", "request_too_large")
        replay = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def replay_receive():
            return replay.pop() if replay else await receive()

        await self.app(scope, replay_receive, send)


async def _reject(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
