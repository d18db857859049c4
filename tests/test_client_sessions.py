"""client/ sessions against a real server (tiny llama, uvicorn on loopback): create,
turns (whole and streamed), info, fork, delete, 409 on a busy session, the async twins,
and `workmem chat` on a server-side session (new, /reset, resumed by id)."""
from __future__ import annotations

import asyncio
import io
import re
import time
from typing import Any

import httpx
import pytest

from client import (
    APIConnectionError, AsyncClient, Client, ConflictError, NotFoundError, Usage,
)
from client.chat import run_chat
from tests.server_fixtures import live_server, make_app, start_engine

ENGINE = dict(max_model_len=256, num_kv_blocks=96, block_size=8)
TURN: dict[str, Any] = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
LONG_TURN: dict[str, Any] = {"max_tokens": 200, "temperature": 0, "ignore_eos": True}
SYSTEM = "Be brief."
ANNOUNCED = re.compile(r"^workmem: (?:resuming )?session (\S+) ", re.M)


@pytest.fixture(scope="module")
def url(tiny_checkpoint):
    engine = start_engine(tiny_checkpoint("llama"), **ENGINE)
    try:
        with live_server(make_app(engine)) as base:
            yield base
    finally:
        engine.shutdown()


def conversation(first_reply: str, second_reply: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "hello there"}, {"role": "assistant", "content": first_reply},
        {"role": "user", "content": "and again"}, {"role": "assistant", "content": second_reply},
    ]


def resident(first: Usage) -> int:
    """Tokens of the first turn's full KV blocks, which the session keeps for the next turn
    (its transcript is prompt + reply; the reply's last token was never computed)."""
    return (first.prompt_tokens + first.completion_tokens - 1) // ENGINE["block_size"] * ENGINE["block_size"]


def split_stream(items: list[str | Usage]) -> tuple[list[str], Usage]:
    *deltas, usage = items
    assert isinstance(usage, Usage) and deltas and all(isinstance(d, str) for d in deltas)
    return deltas, usage


def test_sync_session_turns_info_fork_delete(url: str):
    with Client(url) as c:
        s = c.create_session(system=SYSTEM, ttl_seconds=600, metadata={"user": "t"})
        assert s.id.startswith("sess_") and s.data["num_turns"] == 0
        assert s.data["messages"] == [{"role": "system", "content": SYSTEM}]
        first = s.send("hello there", **TURN)
        assert first.finish_reason == "length" and first.usage is not None
        assert first.usage.completion_tokens == 6
        deltas, usage = split_stream(list(s.send("and again", stream=True, **TURN)))
        assert usage.completion_tokens == 6 and usage.cached_tokens >= resident(first.usage) > 0
        assert usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens
        info = s.info()
        assert info["num_turns"] == 2 and info["metadata"]["user"] == "t"
        assert info["messages"] == conversation(first.text, "".join(deltas))
        fork = s.fork()
        assert fork.id != s.id and fork.data["messages"] == info["messages"]
        early = s.fork(num_turns=1)
        assert early.data["num_turns"] == 1 and early.data["messages"] == info["messages"][:3]
        early.delete()
        s.delete()
        with pytest.raises(NotFoundError) as gone:
            s.info()
        assert gone.value.code == "session_not_found"
        with pytest.raises(NotFoundError):
            s.send("still there?", **TURN)
        assert c.session(fork.id).info()["num_turns"] == 2  # the fork outlives its source
        listed = [x["id"] for x in c.list_sessions()]
        assert fork.id in listed and s.id not in listed
        fork.delete()


async def test_async_session_turns_info_fork_delete(url: str):
    async with AsyncClient(url) as c:
        s = await c.create_session(system=SYSTEM)
        first = await s.send("hello there", **TURN)
        assert first.usage is not None and first.usage.completion_tokens == 6
        deltas, usage = split_stream([item async for item in s.send("and again", stream=True, **TURN)])
        assert usage.cached_tokens >= resident(first.usage) > 0 and usage.completion_tokens == 6
        info = await c.session(s.id).info()  # a handle attached by id sees the same session
        assert info["num_turns"] == 2
        assert info["messages"] == conversation(first.text, "".join(deltas))
        fork = await s.fork(ttl_seconds=60)
        assert fork.id != s.id and (await fork.info())["messages"] == info["messages"]
        await s.delete()
        with pytest.raises(NotFoundError):
            await s.info()
        assert (await fork.info())["num_turns"] == 2
        await fork.delete()


def wait_idle(c: Client, session_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while (info := c.session(session_id).info())["busy"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return info


def test_send_on_busy_session_is_conflict(url: str):
    with Client(url) as a, Client(url) as b:
        s = a.create_session()
        stream = s.send("a long answer please", stream=True, **LONG_TURN)
        try:
            assert isinstance(next(stream), str)  # the turn is running
            assert b.session(s.id).info()["busy"] is True
            with pytest.raises(ConflictError) as clash:
                b.session(s.id).send("me too", **TURN)
            assert clash.value.status == 409 and clash.value.code == "session_busy"
        finally:
            stream.close()  # disconnect: the server aborts the turn
        assert wait_idle(b, s.id)["num_turns"] == 0  # the aborted turn was not committed
        assert b.session(s.id).send("now", **TURN).usage.completion_tokens == 6
        assert b.session(s.id).info()["num_turns"] == 1
        s.delete()


async def test_async_send_on_busy_session_is_conflict(url: str):
    async with AsyncClient(url) as a, AsyncClient(url) as b:
        s = await a.create_session()
        stream = s.send("a long answer please", stream=True, **LONG_TURN)
        try:
            assert isinstance(await anext(stream), str)
            with pytest.raises(ConflictError):
                await b.session(s.id).send("me too", **TURN)
        finally:
            await stream.aclose()
        deadline = time.monotonic() + 10
        while (await s.info())["busy"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await s.delete()


def test_run_chat_resumes_a_session_by_id(url: str):
    with Client(url) as c:
        s = c.create_session(system=SYSTEM)
        out, err = io.StringIO(), io.StringIO()
        status = run_chat(url, temperature=0, max_tokens=5, stdin=io.StringIO("hello there\n\nand again\n"),
                          stdout=out, stderr=err, session_id=s.id)
        assert status == 0, err.getvalue()
        assert ANNOUNCED.findall(err.getvalue()) == [s.id]
        info = s.info()
        assert info["num_turns"] == 2  # only the new lines were sent: no duplicated history
        replies = [m["content"] for m in info["messages"] if m["role"] == "assistant"]
        assert info["messages"] == conversation(*replies)
        assert out.getvalue() == "".join(r + "\n" for r in replies)
        s.delete()


def test_run_chat_new_session_reset_and_unknown_id(url: str):
    out, err = io.StringIO(), io.StringIO()
    status = run_chat(url, system=SYSTEM, temperature=0, max_tokens=4,
                      stdin=io.StringIO("hi\n/reset\nthere\n"), stdout=out, stderr=err)
    assert status == 0, err.getvalue()
    ids = ANNOUNCED.findall(err.getvalue())
    assert len(ids) == 2 and ids[0] != ids[1]  # /reset started a fresh session
    with Client(url) as c:
        before, after = (c.session(i).info() for i in ids)
        for info, text in ((before, "hi"), (after, "there")):
            assert info["num_turns"] == 1
            assert info["messages"][:2] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
            c.session(info["id"]).delete()
    err = io.StringIO()
    assert run_chat(url, stdin=io.StringIO("x\n"), stdout=io.StringIO(), stderr=err, session_id="sess_nope") == 1
    assert "does not exist" in err.getvalue()


def test_cli_chat_session_flag(url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    from server.cli import main

    with Client(url) as c:
        s = c.create_session()
        monkeypatch.setattr("sys.stdin", io.StringIO("hey\n"))
        assert main(["chat", "--url", url, "--session", s.id, "--max-tokens", "3"]) == 0
        assert s.info()["num_turns"] == 1 and s.id in capsys.readouterr().err
        s.delete()
    with pytest.raises(SystemExit):
        main(["chat", "--session", "x", "--new-session"])


def test_session_writes_are_not_retried_after_the_request_may_have_arrived():
    calls: list[str] = []
    failure: list[type[httpx.TransportError]] = [httpx.ReadError]

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        raise failure[0]("boom", request=request)

    http = httpx.Client(transport=httpx.MockTransport(handler))
    with Client("http://t", max_retries=2, http_client=http, sleep=lambda s: None) as c:
        with pytest.raises(APIConnectionError):
            c.session("sess_x").send("hi")
        assert calls == ["/v1/sessions/sess_x/chat/completions"]  # a turn may not be applied twice
        failure[0], calls[:] = httpx.ConnectError, []
        with pytest.raises(APIConnectionError):
            c.create_session()
        assert calls == ["/v1/sessions"] * 3  # never connected: safe to retry
        failure[0], calls[:] = httpx.ReadError, []
        with pytest.raises(APIConnectionError):
            c.session("sess_x").info()
        assert len(calls) == 3  # reads keep the usual policy
    http.close()
