"""One streamed request -> its timings and token counts (httpx + the standard library).

Works with any OpenAI-compatible server: `/v1/completions` chunks carry
`choices[0].text`, `/v1/chat/completions` chunks `choices[0].delta.content`; the usage
chunk (`stream_options.include_usage`) gives the token counts. Every failure (refused
connection, HTTP error status, error event, broken stream) becomes `ok=False` with a
message, never an exception.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

ERROR_BODY_CHARS = 300  # of an error response kept in the message


@dataclass
class RequestResult:
    """One request. Times are seconds from its own start (`start` is perf_counter time);
    `chunk_times` are the arrivals of content-bearing chunks. `output_tokens` and
    `prompt_tokens` come from the server's usage (`counts_from="usage"`), else output
    tokens are the number of content chunks (`counts_from="chunks"`) and prompt tokens 0."""

    start: float
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    counts_from: str = "chunks"
    text: str = ""
    turn: int | None = None  # 1-based turn of a conversation

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than 2 tokens)."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def fail(self, message: str) -> RequestResult:
        self.ok, self.error = False, message
        self.e2e_s = time.perf_counter() - self.start
        return self


@dataclass
class LiveStats:
    """Running totals for the progress display: requests done so far (of `total`, None =
    open-ended) and content chunks streamed (~ output tokens)."""

    total: int | None = None
    completed: int = 0
    failed: int = 0
    chunks: int = 0

    def record(self, r: RequestResult) -> RequestResult:
        if r.ok:
            self.completed += 1
        else:
            self.failed += 1
        return r


class _Stream:
    """Folds SSE lines into a RequestResult."""

    def __init__(self, result: RequestResult, live: LiveStats | None) -> None:
        self.r = result
        self.live = live
        self.done = False
        self.finished = False  # a choice reported finish_reason
        self.usage: dict | None = None
        self.error: str | None = None

    def feed(self, line: str, now: float) -> None:
        if not line.startswith("data:"):
            return
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return
        chunk = json.loads(data)
        if chunk.get("error"):
            self.error = f"error event: {json.dumps(chunk['error'])[:ERROR_BODY_CHARS]}"
        self.usage = chunk.get("usage") or self.usage
        for choice in chunk.get("choices") or ():
            text = choice.get("text") or (choice.get("delta") or {}).get("content")
            if text:
                self.r.chunk_times.append(now - self.r.start)
                self.r.text += text
                if self.live is not None:
                    self.live.chunks += 1
            self.finished = self.finished or bool(choice.get("finish_reason"))

    def close(self, now: float) -> RequestResult:
        r = self.r
        if self.error or not (self.done or self.finished):
            return r.fail(self.error or "stream ended before [DONE] or a finish_reason")
        r.ok, r.e2e_s = True, now - r.start
        r.ttft_s = r.chunk_times[0] if r.chunk_times else None
        if self.usage and "completion_tokens" in self.usage:
            r.counts_from = "usage"
            r.output_tokens = int(self.usage["completion_tokens"])
            r.prompt_tokens = int(self.usage.get("prompt_tokens") or 0)
            r.cached_tokens = int((self.usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        else:
            r.output_tokens = len(r.chunk_times)
        return r


async def stream_request(client: httpx.AsyncClient, path: str, body: dict, turn: int | None = None,
                         live: LiveStats | None = None) -> RequestResult:
    """POST `body` (with `stream` and `include_usage` set) to `path` and time the stream;
    counted in `live` when given."""
    result = await _timed(client, path, body, RequestResult(start=time.perf_counter(), turn=turn), live)
    return live.record(result) if live is not None else result


async def _timed(client: httpx.AsyncClient, path: str, body: dict, result: RequestResult,
                 live: LiveStats | None) -> RequestResult:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    parser = _Stream(result, live)
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:ERROR_BODY_CHARS]
                return result.fail(f"HTTP {response.status_code}: {text}")
            async for line in response.aiter_lines():
                parser.feed(line, time.perf_counter())
    except (httpx.HTTPError, OSError) as exc:
        return result.fail(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    except ValueError as exc:  # bad JSON in an event
        return result.fail(f"malformed event: {exc}")
    return parser.close(time.perf_counter())
