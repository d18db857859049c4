"""Nothing a request causes that can wait runs on the engine thread while other streams
decode: listing sessions reads and parses the store's files in a worker, a new grammar
is compiled in a worker before its request is admitted, storing a response past the
budget reads the stored responses' file heads in a worker, and so does the store's periodic
sweep. Each test records which thread ran the operation (not how long anything took) while
a stream decodes."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from server.engine import grammar
from server.engine.sessions.store import SessionStore
from server.engine.sessions import Session
from tests.server_fixtures import MODEL_NAME, make_app, start_engine

pytestmark = pytest.mark.asyncio
ENGINE_THREAD = "workmem-engine"
LONG = {"prompt": [5, 6, 7], "max_tokens": 240, "ignore_eos": True, "stream": True}


@pytest.fixture
def engine(tiny_checkpoint, tmp_path):
    engine = start_engine(tiny_checkpoint("llama"), max_model_len=256, num_kv_blocks=128, block_size=8,
                          session_dir=str(tmp_path))
    yield engine
    engine.shutdown()


def _record_threads(monkeypatch, owner: object, name: str) -> list[str]:
    """Wrap `owner.name` so each call notes the thread it ran on."""
    threads: list[str] = []
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return threads


async def _while_decoding(client: httpx.AsyncClient, operation):
    """Run `operation()` once a long stream has produced tokens; the stream must still be
    running when the operation returns (so the operation overlapped decoding)."""
    async with client.stream("POST", "/v1/completions", json=LONG) as stream:
        lines = stream.aiter_lines()
        async for line in lines:
            if line.startswith("data: {"):
                break
        result = await operation()
        async for line in lines:
            if line.startswith("data: {"):
                break  # still decoding after the operation
        else:
            pytest.fail("the stream ended before the operation returned")
    return result


async def test_listing_reads_the_store_off_the_engine_thread(engine, monkeypatch):
    sessions = engine.engine.sessions
    for i in range(5):
        sessions.create(Session(f"s{i}", ttl=600))  # before the engine thread has work: test setup only
    threads = _record_threads(monkeypatch, SessionStore, "load_all")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(engine)), base_url="http://t",
                                 timeout=60) as client:
        r = await _while_decoding(client, lambda: client.get("/v1/sessions", params={"limit": 10}))
    assert r.status_code == 200 and [s["id"] for s in r.json()["data"]] == [f"s{i}" for i in range(5)]
    assert threads and ENGINE_THREAD not in threads


async def test_a_new_grammar_compiles_off_the_engine_thread(engine, monkeypatch):
    threads = _record_threads(monkeypatch, grammar, "_compile")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    body = {"prompt": [9, 10, 11], "max_tokens": 20,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(engine)), base_url="http://t",
                                 timeout=60) as client:
        r = await _while_decoding(client, lambda: client.post("/v1/completions", json=body))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].startswith('{"n": ')  # the grammar was applied
    assert threads and ENGINE_THREAD not in threads


async def test_trimming_stored_responses_reads_the_store_off_the_engine_thread(engine, monkeypatch, tmp_path):
    keep = 2
    app = make_app(engine, max_stored_responses=keep)
    body = {"model": MODEL_NAME, "input": "hello there", "max_output_tokens": 4}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as client:
        for _ in range(keep):
            assert (await client.post("/v1/responses", json=body)).status_code == 200
        threads = _record_threads(monkeypatch, SessionStore, "ids")
        r = await _while_decoding(client, lambda: client.post("/v1/responses", json=body))
    assert r.status_code == 200, r.text
    assert len(list(tmp_path.glob("resp_*.session.json"))) == keep  # one stored response was trimmed
    assert threads and ENGINE_THREAD not in threads


async def test_the_store_sweep_reads_file_heads_off_the_engine_thread(engine, monkeypatch, tmp_path):
    """Another replica's sessions in the shared directory: one expired, two not. The sweep
    deletes the expired one; the listing and every file's head are read in a worker, and the
    engine thread reads at most the head of the file it deletes (again, under its lock: a turn
    elsewhere may have renewed it)."""
    other = SessionStore(tmp_path)  # another replica's view of the directory
    other.save(Session("expired", ttl=1, last_used=time.time() - 10))
    for sid in ("fresh-a", "fresh-b"):
        other.save(Session(sid, ttl=600))
    listed = _record_threads(monkeypatch, SessionStore, "ids")
    heads: list[tuple[str, str]] = []
    real_head = SessionStore.head
    monkeypatch.setattr(SessionStore, "head", lambda store, sid: heads.append(
        (threading.current_thread().name, sid)) or real_head(store, sid))
    table = engine.engine.sessions  # test setup: two floats the engine thread reads
    table.sweep_interval_s, table._next_sweep = 0.0, 0.0  # sweep at every expiry check (twice a second)

    async def swept() -> None:
        while other.path("expired").exists():
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(engine)), base_url="http://t",
                                 timeout=60) as client:
        await _while_decoding(client, lambda: asyncio.wait_for(swept(), 30))
    assert sorted(p.name for p in tmp_path.glob("*.session.json")) == ["fresh-a.session.json", "fresh-b.session.json"]
    assert listed and ENGINE_THREAD not in listed
    assert {sid for thread, sid in heads if thread != ENGINE_THREAD} >= {"expired", "fresh-a", "fresh-b"}
    assert {sid for thread, sid in heads if thread == ENGINE_THREAD} <= {"expired"}
