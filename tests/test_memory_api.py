"""What the chat page stands on (ASGI): GET /v1/memory's block partition, fork at a turn,
renaming a session, the page served without a key and --no-ui, and sampling defaults from
generation_config.json / GGUF metadata / flags."""
from __future__ import annotations

import json

import gguf
import httpx
import pytest

from server.sampling_defaults import OPENAI_DEFAULTS, resolve_sampling_defaults
from tests.server_fixtures import make_app, start_engine

ENGINE = dict(max_model_len=256, num_kv_blocks=64, block_size=8)
TURN = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    eng = start_engine(tiny_checkpoint("llama"), **ENGINE)
    yield eng
    eng.shutdown()


@pytest.fixture
async def client(engine):
    app = make_app(engine, api_keys=("k1", "k2"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60,
                                 headers={"Authorization": "Bearer k1"}) as c:
        yield c


async def turn(client, sid: str, text: str) -> dict:
    r = await client.post(f"/v1/sessions/{sid}/chat/completions",
                          json={"messages": [{"role": "user", "content": text}], **TURN})
    assert r.status_code == 200, r.text
    return r.json()


def partition(m: dict) -> int:
    b = m["blocks"]
    own = sum(s["num_own_blocks"] for s in m["sessions"]) + m["other_sessions"]["num_own_blocks"]
    return b["running"] + own + b["shared"] + b["cached"] + b["free"]


async def test_memory_partitions_the_pool_and_tracks_sessions(client):
    m0 = (await client.get("/v1/memory")).json()
    assert m0["blocks"]["total"] == ENGINE["num_kv_blocks"] and partition(m0) == m0["blocks"]["total"]
    assert m0["requests"] == {"running": 0, "waiting": 0}
    sid = (await client.post("/v1/sessions", json={"metadata": {"name": "first"}})).json()["id"]
    await turn(client, sid, "hello there, how are you today")
    m1 = (await client.get("/v1/memory")).json()
    mine = next(s for s in m1["sessions"] if s["id"] == sid)
    assert mine["name"] == "first" and mine["tier"] == "resident" and mine["num_turns"] == 1
    assert mine["num_kv_blocks"] > 0 and m1["blocks"]["pinned"] >= mine["num_kv_blocks"]
    assert m1["blocks"]["pinned"] > m0["blocks"]["pinned"] and partition(m1) == m1["blocks"]["total"]
    # another key sees the pool but not the session's id or name
    other = (await client.get("/v1/memory", headers={"Authorization": "Bearer k2"})).json()
    assert all(s["id"] != sid for s in other["sessions"]) and other["other_sessions"]["count"] >= 1
    assert (await client.get("/v1/memory", headers={"Authorization": "Bearer nope"})).status_code == 401
    await client.delete(f"/v1/sessions/{sid}")
    m2 = (await client.get("/v1/memory")).json()
    assert m2["blocks"]["pinned"] == m0["blocks"]["pinned"] and partition(m2) == m2["blocks"]["total"]


async def test_fork_at_a_turn_keeps_that_prefix_and_shares_its_blocks(client):
    sid = (await client.post("/v1/sessions", json={"messages": [{"role": "system", "content": "be brief"}]})).json()["id"]
    first = await turn(client, sid, "one two three four five six")
    await turn(client, sid, "seven eight nine")
    r = await client.post(f"/v1/sessions/{sid}/fork", json={"num_turns": 1})
    assert r.status_code == 200, r.text
    child = r.json()
    assert child["num_turns"] == 1 and [m["role"] for m in child["messages"]] == ["system", "user", "assistant"]
    assert child["messages"][2]["content"] == first["choices"][0]["message"]["content"]
    assert 0 < child["num_kv_blocks"] and child["num_resident_tokens"] <= child["num_tokens"]
    m = (await client.get("/v1/memory")).json()
    assert next(s for s in m["sessions"] if s["id"] == child["id"])["num_shared_blocks"] > 0
    assert partition(m) == m["blocks"]["total"]
    # the branch takes its own turn from the shared KV; the source is unchanged
    branch = await turn(client, child["id"], "a different second question")
    assert branch["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    source = (await client.get(f"/v1/sessions/{sid}")).json()
    assert source["num_turns"] == 2 and source["messages"][3]["content"] == "seven eight nine"
    r = await client.post(f"/v1/sessions/{sid}/fork", json={"num_turns": 3})
    assert r.status_code == 400 and "has 2 turns" in r.json()["error"]["message"]
    zero = (await client.post(f"/v1/sessions/{sid}/fork", json={"num_turns": 0})).json()
    assert [m["role"] for m in zero["messages"]] == ["system"] and zero["num_turns"] == 0
    for s in (sid, child["id"], zero["id"]):
        await client.delete(f"/v1/sessions/{s}")


async def test_rename_merges_metadata(client):
    s = (await client.post("/v1/sessions", json={"metadata": {"name": "a", "tag": "x"}, "overflow": "truncate"})).json()
    r = await client.post(f"/v1/sessions/{s['id']}", json={"metadata": {"name": "b", "tag": None}})
    assert r.status_code == 200, r.text
    assert r.json()["metadata"] == {"name": "b", "overflow": "truncate"}
    r = await client.post(f"/v1/sessions/{s['id']}", json={"metadata": {"name": "x" * 20000}})
    assert r.status_code == 400 and "bytes" in r.json()["error"]["message"]
    r = await client.post(f"/v1/sessions/{s['id']}", json={"metadata": {"n": "b"}},
                          headers={"Authorization": "Bearer k2"})
    assert r.status_code == 404
    await client.delete(f"/v1/sessions/{s['id']}")


async def test_page_is_served_without_a_key_and_not_with_no_ui(engine, client):
    page = await client.get("/", headers={"Authorization": ""})
    assert page.status_code == 200 and "<textarea id=\"prompt\"" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    script = await client.get("/ui/app.js", headers={"Authorization": ""})
    assert script.status_code == 200 and "/v1/memory" in script.text
    assert (await client.get("/ui/%2e%2e/api/state.py", headers={"Authorization": ""})).status_code == 404
    assert (await client.get("/v1/models", headers={"Authorization": ""})).status_code == 401
    app = make_app(engine, web_ui=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/")).status_code == 404 and (await c.get("/ui/app.js")).status_code == 404
        assert (await c.get("/v1/models")).status_code == 200


async def test_absent_sampling_fields_take_the_server_defaults(engine):
    greedy = resolve_sampling_defaults("unused", "none", {"temperature": 0.0})
    app = make_app(engine, sampling_defaults=greedy)
    body = {"messages": [{"role": "user", "content": "count with me"}], "max_tokens": 8, "ignore_eos": True}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
        model = (await c.get("/v1/models")).json()["data"][0]
        assert model["sampling_defaults"]["temperature"] == 0.0
        assert model["sampling_defaults"]["sources"]["temperature"] == "--default-temperature"
        texts = {(await c.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]["content"]
                 for _ in range(3)}
        assert len(texts) == 1  # greedy by default
        hot = {(await c.post("/v1/chat/completions", json={**body, "temperature": 5.0, "seed": s})).json()
               ["choices"][0]["message"]["content"] for s in range(3)}
        assert len(hot) > 1  # a request's own value still wins


def test_defaults_come_from_the_model_files_then_card_then_openai(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_k": 0, "do_sample": True}))
    d = resolve_sampling_defaults(str(tmp_path), "auto", {"top_p": 0.8}, card={"temperature": 0.2, "min_p": 0.1})
    assert (d.temperature, d.top_p, d.top_k, d.min_p, d.repetition_penalty) == (0.6, 0.8, -1, 0.1, 1.0)
    assert d.sources["temperature"].endswith("generation_config.json") and d.sources["min_p"] == "model card"
    assert resolve_sampling_defaults(str(tmp_path), "none") == OPENAI_DEFAULTS
    assert resolve_sampling_defaults("elsewhere", str(tmp_path)).temperature == 0.6
    with pytest.raises(ValueError, match="generation_config.json"):
        resolve_sampling_defaults(str(tmp_path), str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="temperature"):
        resolve_sampling_defaults(str(tmp_path), "none", {"temperature": -1.0})
    path = tmp_path / "m.gguf"  # GGUF sampling metadata (llama.cpp's keys), beside an array value
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_float32("general.sampling.temp", 0.7)
    writer.add_int32("general.sampling.top_k", 40)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bc", "def"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    d = resolve_sampling_defaults(str(path), "auto")
    assert round(d.temperature, 5) == 0.7 and d.top_k == 40 and d.sources["top_k"] == str(path)
