"""Sessions over HTTP (ASGI): create, turns that reuse resident KV, inspect, fork,
409 on concurrent turns, disconnect leaves the session unchanged, delete, TTL, overflow."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.server_fixtures import live_server, make_app, metric, start_engine

ENGINE = dict(max_model_len=256, num_kv_blocks=96, block_size=8)
TURN = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    eng = start_engine(tiny_checkpoint("llama"), **ENGINE)
    yield eng
    eng.shutdown()


@pytest.fixture
async def client(engine):
    app = make_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
        yield c


async def create(client, **body) -> dict:
    r = await client.post("/v1/sessions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def turn(client, sid: str, text: str, **extra) -> httpx.Response:
    return await client.post(f"/v1/sessions/{sid}/chat/completions",
                             json={"messages": [{"role": "user", "content": text}], **TURN, **extra})


async def test_turns_reuse_kv_and_match_stateless_chat(client):
    s = await create(client, messages=[{"role": "system", "content": "be brief"}], ttl_seconds=600)
    assert s["object"] == "session" and s["id"].startswith("sess_") and len(s["id"]) > 20
    assert s["expires_at"] - s["created"] >= 599
    r1 = await turn(client, s["id"], "hello there")
    assert r1.status_code == 200, r1.text
    first = r1.json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    r2 = await turn(client, s["id"], "and again")
    second = r2.json()
    info = (await client.get(f"/v1/sessions/{s['id']}")).json()
    assert info["num_turns"] == 2 and info["tier"] == "resident" and info["num_kv_blocks"] > 0
    assert [m["role"] for m in info["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert info["messages"][2]["content"] == first["choices"][0]["message"]["content"]
    # The second turn prefilled only the new tokens (plus at most one partial block).
    # Resident: every computed token of turn 1 (its prompt and all but the last reply
    # token), so only the new tokens are prefilled.
    usage = second["usage"]
    computed = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"] - 1
    assert usage["prompt_tokens_details"]["cached_tokens"] == computed
    # Same tokens as a stateless request whose prompt is the session's transcript.
    transcript = info["num_tokens"] - second["usage"]["completion_tokens"]
    assert transcript == usage["prompt_tokens"]


async def test_streamed_turn_and_listing_and_delete(client):
    s = await create(client)
    r = await turn(client, s["id"], "stream me", stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    listed = (await client.get("/v1/sessions")).json()
    assert s["id"] in [x["id"] for x in listed["data"]]
    assert (await client.delete(f"/v1/sessions/{s['id']}")).json()["deleted"] is True
    assert (await client.get(f"/v1/sessions/{s['id']}")).status_code == 404
    r = await turn(client, s["id"], "gone?")
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"


async def test_fork_shares_blocks_and_diverges(client, engine):
    s = await create(client)
    await turn(client, s["id"], "shared history " * 3)
    before = (await client.get(f"/v1/sessions/{s['id']}")).json()
    fork = (await client.post(f"/v1/sessions/{s['id']}/fork")).json()
    assert fork["id"] != s["id"] and fork["num_kv_blocks"] == before["num_kv_blocks"]
    assert fork["messages"] == before["messages"]
    blocks = await engine.call(lambda e: list(e.sessions.get(s["id"]).block_table))
    refs = await engine.call(lambda e: [e.pool.refcount(b) for b in blocks])
    assert all(r >= 2 for r in refs)
    a = (await turn(client, s["id"], "left")).json()
    b = (await turn(client, fork["id"], "right")).json()
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] == before["num_resident_tokens"]
    ia = (await client.get(f"/v1/sessions/{s['id']}")).json()
    ib = (await client.get(f"/v1/sessions/{fork['id']}")).json()
    assert ia["messages"][-2]["content"] == "left" and ib["messages"][-2]["content"] == "right"
    assert a["id"] != b["id"]


def test_concurrent_turn_is_409_and_disconnect_leaves_session_unchanged(engine):
    app = make_app(engine)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        sid = c.post("/v1/sessions", json={}).json()["id"]
        c.post(f"/v1/sessions/{sid}/chat/completions", json={"messages": [{"role": "user", "content": "first"}], **TURN})
        before = c.get(f"/v1/sessions/{sid}").json()
        body = {"messages": [{"role": "user", "content": "long one"}], **TURN, "max_tokens": 200, "stream": True}
        with c.stream("POST", f"/v1/sessions/{sid}/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the turn is running
            assert c.get(f"/v1/sessions/{sid}").json()["busy"]
            clash = c.post(f"/v1/sessions/{sid}/chat/completions", json={"messages": [{"role": "user", "content": "x"}], **TURN})
            assert clash.status_code == 409 and clash.json()["error"]["code"] == "session_busy"
        # the client went away mid-turn
        deadline = time.monotonic() + 10
        while c.get(f"/v1/sessions/{sid}").json()["busy"] and time.monotonic() < deadline:
            time.sleep(0.02)
        after = c.get(f"/v1/sessions/{sid}").json()
        keys = ("num_turns", "num_tokens", "messages", "num_kv_blocks", "busy")
        assert {k: after[k] for k in keys} == {k: before[k] for k in keys}
        text = c.get("/metrics").text
        assert metric(text, "workmem_kv_blocks_used") == metric(text, "workmem_session_blocks_pinned")
        assert metric(text, "workmem_num_requests_running") == 0


async def test_overflow_error_and_truncate(client):
    strict = await create(client)
    r = await turn(client, strict["id"], "word " * 300)
    assert r.status_code == 400 and "256" in r.json()["error"]["message"]
    loose = await create(client, overflow="truncate", messages=[{"role": "system", "content": "sys"}])
    for i in range(4):
        r = await turn(client, loose["id"], f"turn {i} " + "pad " * 40, max_tokens=4)
        assert r.status_code == 200, r.text
    info = (await client.get(f"/v1/sessions/{loose['id']}")).json()
    assert info["messages"][0]["role"] == "system" and info["num_tokens"] < 256


async def test_ttl_expiry_and_metrics(client):
    s = await create(client, ttl_seconds=0.2)
    await turn(client, s["id"], "short lived")
    await asyncio.sleep(1.2)  # the engine thread checks expiry at least every 0.5 s
    assert (await client.get(f"/v1/sessions/{s['id']}")).status_code == 404
    text = (await client.get("/metrics")).text
    listed = (await client.get("/v1/sessions")).json()["data"]
    assert s["id"] not in [x["id"] for x in listed]
    assert metric(text, "workmem_sessions_active") == len(listed)
    metric(text, "workmem_session_blocks_pinned")
    metric(text, "workmem_session_evictions_total")
    assert 'workmem_session_restores_total{source="recompute"}' in text


async def test_bad_session_requests(client):
    assert (await client.post("/v1/sessions", json={"ttl_seconds": -1})).status_code == 400
    assert (await client.post("/v1/sessions", json={"model": "nope"})).status_code == 404
    assert (await client.post("/v1/sessions/sess_missing/fork")).status_code == 404
    assert (await client.delete("/v1/sessions/sess_missing")).status_code == 404
