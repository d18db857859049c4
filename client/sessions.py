"""Server-side sessions: a conversation whose history (and resident KV cache) the server
keeps between turns, so each turn sends only its new messages.

    with Client(url) as c:
        s = c.create_session(system="Be brief.")
        print(s.send("Hi", max_tokens=32).text)
        for item in s.send("And then?", stream=True):   # text deltas, then a Usage
            ...
        c.session(s.id).info()["num_turns"]             # attach by id, e.g. to resume

    async with AsyncClient(url) as c:
        s = await c.create_session()
        reply = await s.send("Hi")
        async for item in s.send("More", stream=True):
            ...

Creating, forking, deleting and turns change server state, so they are not retried
after a transport failure that may have reached the server (a turn could be applied
twice); 429 and 503 are retried as usual. A busy session (a turn already running) raises
ConflictError, an unknown or deleted one NotFoundError.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Awaitable, Iterator, Literal, overload

from client.core import Completion, Messages, Transport, Usage, fork_body, response_json, session_path, turn_body


class Session:
    """A server-side session seen through a `Client` (any blocking `Transport`). `data` is the session object from
    the last create/fork/info answer (empty for a handle made by `Client.session`)."""

    def __init__(self, client: Transport, session_id: str, data: dict[str, Any] | None = None) -> None:
        self.client, self.id, self.data = client, session_id, dict(data or {})

    @overload
    def send(self, messages: Messages | str, stream: Literal[False] = False, **params: Any) -> Completion: ...
    @overload
    def send(self, messages: Messages | str, stream: Literal[True], **params: Any) -> Iterator[str | Usage]: ...

    def send(self, messages: Messages | str, stream: bool = False, **params: Any) -> Completion | Iterator[str | Usage]:
        """One turn (a string is one user message). Streamed: text deltas, then its Usage."""
        body = turn_body(self.client.model, messages, params, stream)
        path = session_path(self.id, "/chat/completions")
        if stream:
            return self.client.stream_events(path, body, chat=True, idempotent=False)
        return Completion.from_response(response_json(self.client.request(path, body, idempotent=False)), chat=True)

    def info(self) -> dict[str, Any]:
        self.data = response_json(self.client.request(session_path(self.id)))
        return self.data

    def fork(self, ttl_seconds: float | None = None, num_turns: int | None = None) -> Session:
        """A new session sharing this one's history (and its KV blocks on the server), or
        only its first `num_turns` turns."""
        resp = self.client.request(session_path(self.id, "/fork"), fork_body(ttl_seconds, num_turns),
                                   idempotent=False)
        data = response_json(resp)
        return Session(self.client, data["id"], data)

    def delete(self) -> None:
        self.client.request(session_path(self.id), method="DELETE", idempotent=False)

    def __repr__(self) -> str:
        return f"Session({self.id!r})"


class AsyncSession:
    """`Session` for an `AsyncClient`: `await s.send(...)` for a Completion, or
    `async for item in s.send(..., stream=True)` for deltas then a Usage."""

    def __init__(self, client: Transport, session_id: str, data: dict[str, Any] | None = None) -> None:
        self.client, self.id, self.data = client, session_id, dict(data or {})

    @overload
    def send(self, messages: Messages | str, stream: Literal[False] = False, **params: Any) -> Awaitable[Completion]: ...
    @overload
    def send(self, messages: Messages | str, stream: Literal[True], **params: Any) -> AsyncIterator[str | Usage]: ...

    def send(
        self, messages: Messages | str, stream: bool = False, **params: Any,
    ) -> Awaitable[Completion] | AsyncIterator[str | Usage]:
        body = turn_body(self.client.model, messages, params, stream)
        path = session_path(self.id, "/chat/completions")
        if stream:
            return self.client.stream_events(path, body, chat=True, idempotent=False)
        return self._complete(path, body)

    async def info(self) -> dict[str, Any]:
        self.data = response_json(await self.client.request(session_path(self.id)))
        return self.data

    async def fork(self, ttl_seconds: float | None = None, num_turns: int | None = None) -> AsyncSession:
        resp = await self.client.request(session_path(self.id, "/fork"), fork_body(ttl_seconds, num_turns),
                                         idempotent=False)
        data = response_json(resp)
        return AsyncSession(self.client, data["id"], data)

    async def delete(self) -> None:
        await self.client.request(session_path(self.id), method="DELETE", idempotent=False)

    async def _complete(self, path: str, body: dict[str, Any]) -> Completion:
        resp = await self.client.request(path, body, idempotent=False)
        return Completion.from_response(response_json(resp), chat=True)

    def __repr__(self) -> str:
        return f"AsyncSession({self.id!r})"
