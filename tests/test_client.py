"""client/ against a stand-in OpenAI-shaped server: a small FastAPI app served by a real
uvicorn on loopback. The stand-in answers with canned replies ("You said: <last user
message>" for chat, "<prompt> and more" for completions), streams them word by word, and
plays scripted failures (one per POST) so retries and typed errors can be checked."""
from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

import client.core as client_mod  # the retry policy lives in the core
from client import (
    APIConnectionError, AsyncClient, AuthenticationError, BadRequestError, Client, NotFoundError,
    PayloadTooLargeError, RateLimitError, ServerError, ServiceUnavailableError, StreamParser, Usage,
    WorkmemError,
)
from client.chat import run_chat
from client.errors import error_from_response

MODEL_IDS = ["stub-model", "other-model"]
PROMPT_TOKENS, CACHED_TOKENS = 7, 3
MIDSTREAM_ERROR, TRUNCATED = "midstream_error", "truncated"


@dataclass
class Fail:
    """A scripted OpenAI-shaped error response."""

    status: int
    message: str = "scripted failure"
    type: str = "scripted_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Stub:
    url: str = ""
    script: list[Any] = field(default_factory=list)  # consumed one entry per POST
    requests: list[dict[str, Any]] = field(default_factory=list)
    api_key: str | None = None
    healthy: bool = True

    def posts(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "POST"]

    def gets(self, path: str) -> int:
        return sum(r["method"] == "GET" and r["path"] == path for r in self.requests)


def pieces(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text)


def reply_for(body: dict[str, Any], chat: bool) -> str:
    if chat:
        return "You said: " + body["messages"][-1]["content"]
    prompt = body["prompt"]
    return f"{len(prompt)} tokens then more" if isinstance(prompt, list) else prompt + " and more"


def usage_for(text: str) -> dict[str, Any]:
    n = len(pieces(text))
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n,
            "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS}}


def error_response(fail: Fail) -> JSONResponse:
    body = {"error": {"message": fail.message, "type": fail.type, "param": fail.param, "code": fail.code}}
    return JSONResponse(body, fail.status, headers=fail.headers)


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def events(body: dict[str, Any], chat: bool, action: Any):
    text = reply_for(body, chat)
    usage_field = {"usage": None} if body.get("stream_options", {}).get("include_usage") else {}

    def chunk(choice: dict[str, Any]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        return {"id": "x", "object": kind, "created": 0, "model": body["model"], "choices": [choice], **usage_field}

    yield ": keep-alive\n\n"
    if chat:
        yield sse(chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}))
    for i, piece in enumerate(pieces(text)):
        if i == 1 and action == MIDSTREAM_ERROR:
            yield sse({"error": {"message": "engine died", "type": "server_error", "param": None, "code": "engine_dead"}})
            return
        if i == 1 and action == TRUNCATED:
            return
        delta = {"delta": {"content": piece}} if chat else {"text": piece}
        yield sse(chunk({"index": 0, **delta, "finish_reason": None}))
    last = {"delta": {}} if chat else {"text": ""}
    yield sse(chunk({"index": 0, **last, "finish_reason": "stop" if chat else "length"}))
    if usage_field:
        yield sse({"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": usage_for(text)})
    yield "data: [DONE]\n\n"


def make_app(stub: Stub) -> FastAPI:
    app = FastAPI()

    def record(request: Request, body: Any = None) -> None:
        stub.requests.append({"method": request.method, "path": request.url.path,
                              "auth": request.headers.get("authorization"), "body": body})

    async def generate(request: Request, chat: bool):
        body = await request.json()
        record(request, body)
        if stub.api_key and request.headers.get("authorization") != f"Bearer {stub.api_key}":
            return error_response(Fail(401, "invalid API key", "authentication_error"))
        action = stub.script.pop(0) if stub.script else None
        if isinstance(action, Fail):
            return error_response(action)
        if body.get("stream"):
            return StreamingResponse(events(body, chat, action), media_type="text/event-stream")
        text = reply_for(body, chat)
        choice = ({"message": {"role": "assistant", "content": text}, "finish_reason": "stop"} if chat
                  else {"text": text, "finish_reason": "length"})
        kind = "chat.completion" if chat else "text_completion"
        return {"id": "x", "object": kind, "created": 0, "model": body["model"],
                "choices": [{"index": 0, **choice}], "usage": usage_for(text)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        record(request)
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "workmem"} for m in MODEL_IDS]}

    @app.get("/health")
    async def health(request: Request):
        record(request)
        return JSONResponse({}, 200 if stub.healthy else 503)

    return app


@pytest.fixture(scope="module")
def server():
    stub = Stub()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    stub.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = uvicorn.Server(uvicorn.Config(make_app(stub), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "stand-in server did not start"
        time.sleep(0.01)
    yield stub
    srv.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def stub(server: Stub) -> Stub:
    server.script.clear()
    server.requests.clear()
    server.api_key, server.healthy = None, True
    return server


@pytest.fixture
def dead_url() -> str:
    """A loopback URL with nothing listening (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def recording_client(url: str, **kw: Any) -> tuple[Client, list[float]]:
    sleeps: list[float] = []
    return Client(url, sleep=sleeps.append, **kw), sleeps


def recording_async_client(url: str, **kw: Any) -> tuple[AsyncClient, list[float]]:
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    return AsyncClient(url, sleep=sleep, **kw), sleeps


# ---------------------------------------------------------------- sync client


def test_complete_returns_text_usage_and_sends_api_key(stub: Stub):
    stub.api_key = "sekrit"
    with Client(stub.url + "/v1/", api_key="sekrit", model="m1") as c:
        out = c.complete("Hi", max_tokens=5, temperature=0)
    assert (out.text, out.finish_reason) == ("Hi and more", "length")
    assert out.usage == Usage(PROMPT_TOKENS, 3, PROMPT_TOKENS + 3, CACHED_TOKENS)
    assert out.raw["object"] == "text_completion"
    [req] = stub.posts()
    assert req["auth"] == "Bearer sekrit"
    assert req["body"] == {"model": "m1", "prompt": "Hi", "max_tokens": 5, "temperature": 0}
    assert stub.gets("/v1/models") == 0


def test_missing_api_key_is_authentication_error_and_not_retried(stub: Stub):
    stub.api_key = "sekrit"
    c, sleeps = recording_client(stub.url, model="m1")
    with pytest.raises(AuthenticationError) as info:
        c.chat("hello")
    assert (info.value.status, info.value.type, info.value.message) == (401, "authentication_error", "invalid API key")
    assert stub.posts()[0]["auth"] is None
    assert len(stub.posts()) == 1 and sleeps == []


def test_model_discovered_once_and_overridable(stub: Stub):
    with Client(stub.url) as c:
        first = c.chat("hello")
        c.chat([{"role": "user", "content": "again"}])
        c.complete("x", model="other-model")
        assert c.model == "stub-model"
    assert first.text == "You said: hello" and first.finish_reason == "stop"
    assert stub.gets("/v1/models") == 1
    bodies = [r["body"] for r in stub.posts()]
    assert [b["model"] for b in bodies] == ["stub-model", "stub-model", "other-model"]
    assert bodies[0]["messages"] == [{"role": "user", "content": "hello"}]


def test_stream_chat_yields_deltas_then_usage(stub: Stub):
    with Client(stub.url, model="m1") as c:
        items = list(c.stream_chat([{"role": "user", "content": "tell me more"}], max_tokens=9))
    *deltas, usage = items
    assert all(isinstance(d, str) for d in deltas) and len(deltas) == 5
    assert "".join(deltas) == "You said: tell me more"
    assert usage == Usage(PROMPT_TOKENS, 5, PROMPT_TOKENS + 5, CACHED_TOKENS)
    body = stub.posts()[0]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 9


def test_stream_complete_with_token_ids(stub: Stub):
    with Client(stub.url, model="m1") as c:
        items = list(c.stream_complete([1, 2, 3]))
    assert "".join(i for i in items if isinstance(i, str)) == "3 tokens then more"
    assert isinstance(items[-1], Usage) and items[-1].completion_tokens == 4
    assert stub.posts()[0]["body"]["prompt"] == [1, 2, 3]


def test_stream_param_is_rejected_on_non_streaming_call(stub: Stub):
    with Client(stub.url, model="m1") as c, pytest.raises(TypeError):
        c.complete("x", stream=True)
    assert stub.posts() == []


def test_429_waits_retry_after_instead_of_backoff(stub: Stub):
    stub.script = [Fail(429, "queue full", "rate_limit_error", headers={"Retry-After": "0.3"})]
    with Client(stub.url, model="m1", backoff=5.0) as c:
        start = time.monotonic()
        out = c.complete("Hi")
        elapsed = time.monotonic() - start
    assert out.text == "Hi and more"
    assert 0.3 <= elapsed < 2.0  # slept Retry-After (0.3 s), not backoff (5 s)
    assert len(stub.posts()) == 2


def test_503_retried_with_exponential_backoff(stub: Stub):
    stub.script = [Fail(503, "warming up")] * 3
    c, sleeps = recording_client(stub.url, model="m1", backoff=0.25)  # sleeps recorded, not slept
    assert c.chat("ok").text == "You said: ok"
    assert sleeps == [0.25, 0.5, 1.0]
    assert len(stub.posts()) == 4


def test_retries_exhausted_raises_last_error(stub: Stub):
    stub.script = [Fail(503, "engine dead", "service_unavailable_error")] * 3
    c, sleeps = recording_client(stub.url, model="m1", max_retries=2, backoff=0.01)
    with pytest.raises(ServiceUnavailableError) as info:
        c.complete("x")
    assert isinstance(info.value, ServerError)
    assert (info.value.status, info.value.message) == (503, "engine dead")
    assert len(stub.posts()) == 3 and len(sleeps) == 2


def test_retry_after_is_capped_and_exposed(stub: Stub, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(client_mod, "MAX_RETRY_WAIT_S", 0.05)
    stub.script = [Fail(429, headers={"Retry-After": "3600"})] * 2
    c, sleeps = recording_client(stub.url, model="m1")
    assert c.complete("x").text == "x and more"
    assert sleeps == [0.05, 0.05]
    stub.script = [Fail(429, "queue full", "rate_limit_error", headers={"Retry-After": "7"})]
    with pytest.raises(RateLimitError) as info:
        Client(stub.url, model="m1", max_retries=0).complete("x")
    assert info.value.retry_after == 7.0 and info.value.status == 429


@pytest.mark.parametrize("status, cls", [
    (400, BadRequestError), (404, NotFoundError), (413, PayloadTooLargeError), (500, ServerError),
])
def test_other_errors_are_typed_and_not_retried(stub: Stub, status: int, cls: type):
    stub.script = [Fail(status, f"bad {status}", "invalid_request_error", "temperature", "invalid_value")]
    c, sleeps = recording_client(stub.url, model="m1")
    with pytest.raises(cls) as info:
        c.complete("x", temperature=-1)
    err = info.value
    assert (err.status, err.message, err.type, err.param, err.code) == (
        status, f"bad {status}", "invalid_request_error", "temperature", "invalid_value")
    assert len(stub.posts()) == 1 and sleeps == []


def test_stream_is_retried_before_first_byte(stub: Stub):
    stub.script = [Fail(503)]
    c, sleeps = recording_client(stub.url, model="m1", backoff=0.01)
    text = "".join(i for i in c.stream_chat("hey") if isinstance(i, str))
    assert text == "You said: hey"
    assert len(stub.posts()) == 2 and sleeps == [0.01]


def test_error_event_mid_stream_raises_and_is_not_retried(stub: Stub):
    stub.script = [MIDSTREAM_ERROR]
    c, sleeps = recording_client(stub.url, model="m1")
    got: list[Any] = []
    with pytest.raises(WorkmemError) as info:
        for item in c.stream_chat("hello there"):
            got.append(item)
    assert got == ["You "]
    assert (info.value.message, info.value.type, info.value.code) == ("engine died", "server_error", "engine_dead")
    assert len(stub.posts()) == 1 and sleeps == []


def test_stream_cut_before_done_is_connection_error(stub: Stub):
    stub.script = [TRUNCATED]
    c, _ = recording_client(stub.url, model="m1")
    with pytest.raises(APIConnectionError, match="DONE"):
        list(c.stream_complete("a b c"))
    assert len(stub.posts()) == 1


def test_connection_refused_is_retried_then_raised(dead_url: str):
    c, sleeps = recording_client(dead_url, model="m1", max_retries=2, backoff=0.01)
    with pytest.raises(APIConnectionError):
        c.complete("x")
    assert sleeps == [0.01, 0.02]
    assert c.health() is False


def test_models_and_health(stub: Stub):
    with Client(stub.url) as c:
        assert c.models() == MODEL_IDS
        assert c.health() is True
        stub.healthy = False
        assert c.health() is False


# ---------------------------------------------------------------- parsing


def test_stream_parser_handles_comments_multiline_data_and_done():
    lines = [
        ": keep-alive", "", "event: message", "id: 1",
        'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "a"}}]}', "",
        'data:{"choices":[{"index":1,"delta":{"content":"x"}},{"index":0,"delta":{"content":"b"}}]}\r', "",
        'data: {"choices": [],', 'data:  "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}', "",
        "data: [DONE]", "",
        'data: {"choices": [{"index": 0, "delta": {"content": "ignored"}}]}', "",
    ]
    parser = StreamParser(chat=True)
    items = [item for line in lines for item in parser.feed(line)]
    assert items == ["a", "b", Usage(1, 2, 3, 0)]
    assert parser.done and parser.finish() == []


def test_stream_parser_errors():
    parser = StreamParser(chat=False)
    assert parser.feed('data: {"choices": [{"index": 0, "text": "t"}]}') == []  # no blank line yet
    with pytest.raises(APIConnectionError):
        parser.finish()  # flushes "t" but [DONE] never came
    parser = StreamParser(chat=True)
    parser.feed('data: {"error": {"message": "full", "type": "rate_limit_error", "code": 429}}')
    with pytest.raises(RateLimitError) as info:
        parser.feed("")  # the blank line dispatches the event
    assert info.value.message == "full" and info.value.status == 429
    parser = StreamParser(chat=True)
    parser.feed("data: {not json")
    with pytest.raises(WorkmemError, match="malformed"):
        parser.feed("")


def test_error_from_non_openai_bodies():
    err = error_from_response(502, "<html>Bad gateway</html>", {})
    assert isinstance(err, ServerError) and err.status == 502 and "Bad gateway" in err.message
    err = error_from_response(404, '{"detail": "Not Found"}', {})
    assert isinstance(err, NotFoundError) and err.message == "Not Found"
    err = error_from_response(429, "{}", {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert isinstance(err, RateLimitError) and err.retry_after == 0.0  # a date in the past


# ---------------------------------------------------------------- async client


@pytest.mark.asyncio
async def test_async_chat_complete_and_discovery(stub: Stub):
    stub.api_key = "k"
    async with AsyncClient(stub.url, api_key="k") as c:
        chat = await c.chat("hello")
        comp = await c.complete("Hi", max_tokens=3)
        assert await c.models() == MODEL_IDS
        assert await c.health() is True
    assert chat.text == "You said: hello" and comp.text == "Hi and more"
    assert comp.usage is not None and comp.usage.cached_tokens == CACHED_TOKENS
    assert stub.gets("/v1/models") == 2  # one discovery + the explicit models() call
    assert [r["body"]["model"] for r in stub.posts()] == ["stub-model", "stub-model"]
    assert all(r["auth"] == "Bearer k" for r in stub.posts())


@pytest.mark.asyncio
async def test_async_stream_chat_after_429(stub: Stub):
    stub.script = [Fail(429, headers={"Retry-After": "0.02"})]
    c, sleeps = recording_async_client(stub.url, model="m1", backoff=5.0)
    items = [item async for item in c.stream_chat("stream me")]
    await c.close()
    assert "".join(i for i in items if isinstance(i, str)) == "You said: stream me"
    assert items[-1] == Usage(PROMPT_TOKENS, 4, PROMPT_TOKENS + 4, CACHED_TOKENS)
    assert sleeps == [0.02] and len(stub.posts()) == 2


@pytest.mark.asyncio
async def test_async_stream_complete(stub: Stub):
    async with AsyncClient(stub.url, model="m1") as c:
        text = "".join([i async for i in c.stream_complete("go") if isinstance(i, str)])
    assert text == "go and more"


@pytest.mark.asyncio
async def test_async_bad_request_not_retried(stub: Stub):
    stub.script = [Fail(400, "max_tokens must be >= 1", "invalid_request_error", "max_tokens")]
    c, sleeps = recording_async_client(stub.url, model="m1")
    with pytest.raises(BadRequestError) as info:
        await c.complete("x", max_tokens=0)
    await c.close()
    assert (info.value.param, info.value.status) == ("max_tokens", 400)
    assert len(stub.posts()) == 1 and sleeps == []


@pytest.mark.asyncio
async def test_async_midstream_error_and_connection_error(stub: Stub, dead_url: str):
    stub.script = [MIDSTREAM_ERROR]
    got: list[Any] = []
    async with AsyncClient(stub.url, model="m1") as c:
        with pytest.raises(WorkmemError, match="engine died"):
            async for item in c.stream_chat("hello there"):
                got.append(item)
    assert got == ["You "] and len(stub.posts()) == 1
    c, sleeps = recording_async_client(dead_url, model="m1", max_retries=1, backoff=0.01)
    with pytest.raises(APIConnectionError):
        await c.complete("x")
    assert sleeps == [0.01] and await c.health() is False
    await c.close()


# ---------------------------------------------------------------- run_chat


class RecordingOut(io.StringIO):
    """StringIO remembering each write and flush."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)

    def flush(self) -> None:
        self.flushes += 1


def test_run_chat_piped_streams_and_keeps_history(stub: Stub):
    stdin = io.StringIO("hello\nsecond turn\n\n/reset\nthird\n")
    out = RecordingOut()
    status = run_chat(stub.url, None, None, "Be brief.", 0.0, 20, stdin, out)
    assert status == 0
    assert out.getvalue() == "You said: hello\nYou said: second turn\nYou said: third\n"
    assert out.writes[:4] == ["You ", "said: ", "hello", "\n"]  # token by token, no prompt
    assert out.flushes >= 3
    bodies = [r["body"] for r in stub.posts()]
    assert len(bodies) == 3
    assert bodies[1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "You said: hello"},
        {"role": "user", "content": "second turn"},
    ]
    assert bodies[2]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "third"}]
    assert bodies[0]["temperature"] == 0.0 and bodies[0]["max_tokens"] == 20
    assert bodies[0]["model"] == "stub-model"


def test_run_chat_exit_stops_reading(stub: Stub):
    out = io.StringIO()
    assert run_chat(stub.url, None, "m1", None, None, None, io.StringIO("hi\n/exit\nnever\n"), out) == 0
    assert out.getvalue() == "You said: hi\n"
    [req] = stub.posts()
    assert req["body"]["messages"] == [{"role": "user", "content": "hi"}]
    assert "temperature" not in req["body"] and "max_tokens" not in req["body"]


def test_run_chat_piped_error_exits_nonzero(stub: Stub):
    stub.script = [Fail(400, "prompt too long", "invalid_request_error")]
    out, err = io.StringIO(), io.StringIO()
    status = run_chat(stub.url, None, "m1", None, None, None, io.StringIO("a\nb\n"), out, stderr=err)
    assert status == 1
    assert out.getvalue() == "" and "prompt too long" in err.getvalue()
    assert len(stub.posts()) == 1


class TTYIn(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_run_chat_tty_prompts_and_survives_errors(stub: Stub):
    stub.script = [Fail(400, "prompt too long", "invalid_request_error")]
    out, err = io.StringIO(), io.StringIO()
    status = run_chat(stub.url, None, "m1", None, None, None, TTYIn("a\nb\n/reset\n"), out, stderr=err)
    assert status == 0
    lines = out.getvalue().splitlines()
    assert lines[1:] == ["> > You said: b", "> (history cleared)", "> "]  # banner first
    assert "prompt too long" in err.getvalue()
    assert stub.posts()[1]["body"]["messages"] == [{"role": "user", "content": "b"}]  # failed turn dropped


def test_client_package_imports_no_torch_or_server():
    import subprocess
    import sys

    code = ("import sys, client, client.chat; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'server', 'model', 'fastapi')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_httpx_client_can_be_injected(stub: Stub):
    http = httpx.Client(headers={"X-Trace": "1"})
    with Client(stub.url, model="m1", http_client=http) as c:
        assert c.complete("x").text == "x and more"
    assert not http.is_closed  # an injected client is the caller's to close
    http.close()
