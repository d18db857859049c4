"""OpenAI's envelope around chat and completions choices, whole or streamed.

    whole   {"id", "object": "chat.completion" | "text_completion", "created", "model", "choices", "usage"}
    stream  data: {"id", "object": "chat.completion.chunk" | "text_completion", ..., "choices": [one]}
            ... [data: {..., "choices": [], "usage"} with include_usage] data: [DONE]

A failure after the stream began is one `data: {"error": ...}` event before [DONE].
"""
from __future__ import annotations

import time
from typing import AsyncIterator, Callable, Iterable

from fastapi import Request
from fastapi.responses import JSONResponse

from model.tokenizer import Tokenizer
from server.api.core import Delta, Generation
from server.api.errors import APIError, error_body
from server.api.sse import DONE, EventStream, sse, until_disconnect

CHUNK_OBJECTS = {"chat.completion": "chat.completion.chunk", "text_completion": "text_completion"}


class Envelope:
    """The id, object, creation time and model one response's JSON and chunks carry."""

    def __init__(self, request_id: str, obj: str, model: str, tok: Tokenizer) -> None:
        self.id, self.obj, self.model, self.tok = request_id, obj, model, tok
        self.created = int(time.time())

    def response(self, choices: list[dict], usage: dict) -> JSONResponse:
        return JSONResponse({"id": self.id, "object": self.obj, "created": self.created,
                             "model": self.model, "choices": choices, "usage": usage})

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        data = {"id": self.id, "object": CHUNK_OBJECTS[self.obj], "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return data

    def token_text(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)


async def chunk_stream(request: Request, gen: Generation, env: Envelope, include_usage: bool,
                       chunks: Callable[[Delta], Iterable[dict]], opening: Iterable[dict] = ()) -> EventStream:
    """Start the request (a refusal is a JSON 4xx here), then stream: each `opening` choice,
    then each choice `chunks` makes of a Delta, one per chunk."""
    await until_disconnect(request, gen.start())

    async def body() -> AsyncIterator[bytes]:
        try:
            for choice in opening:
                yield sse(env.chunk([choice]))
            async for d in gen.events():
                for choice in chunks(d):
                    yield sse(env.chunk([choice]))
            if include_usage:
                yield sse(env.chunk([], usage=gen.usage.as_dict()))
        except APIError as err:
            yield sse(error_body(err.status, err.message, code=err.code))
        finally:
            await gen.aclose()
        yield DONE

    return EventStream(body())
