"""Server-Sent Events and client-disconnect handling.

`EventStream` always watches the connection for `http.disconnect` (whatever ASGI spec
version the server speaks) and cancels the body iterator when the client goes away, so
the request is aborted within one engine step. `until_disconnect` does the same for
non-streaming handlers, including while the request still waits in the queue.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, TypeVar

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.errors import APIError

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"
STREAMED = {200: {"content": {"application/json": {}, "text/event-stream": {}}}}  # a route's answer: JSON, or SSE with stream


def sse(data: Any) -> bytes:
    """One event: `data: <json>` and the blank line that ends it."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class EventStream(StreamingResponse):
    """text/event-stream response cancelled as soon as the client disconnects."""

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass  # the client went away mid-write
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; cancel it (aborting its engine requests) if the client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise APIError(400, "client disconnected", code="client_disconnected")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
