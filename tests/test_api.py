"""In-process HTTP tests (httpx ASGITransport) for every endpoint and error path."""
from __future__ import annotations

import asyncio
import gc
import json

import httpx
import pytest

from model.sampling import SamplingParams
from server.engine import LLM
from tests.server_fixtures import MODEL_NAME, make_app, metric, start_engine

pytestmark = pytest.mark.asyncio
ENGINE = dict(max_model_len=128, num_kv_blocks=64, block_size=8)


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = start_engine(model_dir, **ENGINE)
    yield eng
    eng.shutdown()


@pytest.fixture
async def client(engine):
    app = make_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(str(model_dir), dtype="float32", device="cpu", **ENGINE)


def events(body: str) -> list:
    """Parse an SSE body; every event must be `data: ...` followed by a blank line."""
    assert body.endswith("\n\n")
    out = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    assert out[-1] == "[DONE]"
    return out[:-1]


async def test_completion_matches_offline_engine(client, offline):
    r = await client.post("/v1/completions", json={"prompt": "The quick brown", "max_tokens": 10, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    (expected,) = offline.generate(["The quick brown"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert body["choices"][0]["text"] == expected.text
    assert body["object"] == "text_completion" and body["model"] == MODEL_NAME and body["id"].startswith("cmpl-")
    usage = body["usage"]
    assert usage["completion_tokens"] == 10 and usage["prompt_tokens"] == len(expected.prompt_token_ids)
    assert usage["total_tokens"] == usage["prompt_tokens"] + 10
    assert body["choices"][0]["finish_reason"] == "length"


async def test_chat_stream_format_and_usage(client, offline, engine):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    req = {"messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    whole = (await client.post("/v1/chat/completions", json=req)).json()
    r = await client.post("/v1/chat/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    # The same prompt again is served from the prefix cache.
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    ids = engine.engine.tokenizer.encode_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])
    (expected,) = offline.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert text == expected.text


async def test_many_prompts_n_and_logprobs(client):
    r = await client.post("/v1/completions", json={
        "prompt": [[5, 6, 7], [8, 9, 10, 11]], "n": 2, "max_tokens": 4, "temperature": 0.8, "seed": 3,
        "logprobs": 2, "ignore_eos": True})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for c in body["choices"]:
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
        assert all(v <= 0 for v in lp["token_logprobs"])
        # keyed by token text (OpenAI's shape), so distinct ids with equal text may merge
        assert all(1 <= len(top) <= 3 for top in lp["top_logprobs"])
        assert all(tok in top for tok, top in zip(lp["tokens"], lp["top_logprobs"]))
        assert "".join(lp["tokens"]) == c["text"]
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True, "top_logprobs": 2, "ignore_eos": True})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in content)


async def test_echo_and_stop(client):
    r = await client.post("/v1/completions", json={"prompt": "The quick", "max_tokens": 3, "echo": True, "temperature": 0})
    assert r.json()["choices"][0]["text"].startswith("The quick")
    free = (await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 12, "temperature": 0, "ignore_eos": True})).json()
    text = free["choices"][0]["text"]
    stop = text[3:5]
    r = await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stop": stop})
    assert r.json()["choices"][0]["text"] == text[: text.index(stop)]
    assert r.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 1000}, "n"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "stop": ["a"] * 40}, "stop"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [10**7]}, "prompt"),
    ({"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias"),
    ({}, "prompt"),
])
async def test_invalid_parameters_are_400(client, body, param):
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert param in (err["param"] or "") or param in err["message"]


async def test_nan_and_malformed_json_are_400(client):
    r = await client.post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}',
                          headers={"content-type": "application/json"})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = await client.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


async def test_context_limits_name_both_numbers(client):
    r = await client.post("/v1/completions", json={"prompt": [1] * 200})
    assert r.status_code == 400 and "128" in r.json()["error"]["message"] and "200" in r.json()["error"]["message"]
    r = await client.post("/v1/completions", json={"prompt": [1] * 100, "max_tokens": 50})
    msg = r.json()["error"]["message"]
    assert r.status_code == 400 and "max_tokens=50" in msg and "100" in msg and "128" in msg


async def test_unknown_model_and_route_are_404(client):
    r = await client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = await client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


async def test_api_key_and_body_limit(engine):
    app = make_app(engine, api_keys=("sekret",), max_request_bytes=2000)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        body = {"prompt": "x", "max_tokens": 1}
        assert (await c.post("/v1/completions", json=body)).status_code == 401
        r = await c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = await c.post("/v1/completions", json=body, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert (await c.get("/health")).status_code == 200  # open path
        big = {"prompt": "x" * 5000}
        r = await c.post("/v1/completions", json=big, headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


async def test_queue_full_is_429_with_retry_after(model_dir):
    eng = start_engine(model_dir, max_queue_len=1, max_num_seqs=1, **ENGINE)
    app = make_app(eng)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            body = {"prompt": [1, 2, 3], "max_tokens": 60, "ignore_eos": True}
            results = await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(6)])
        codes = sorted(r.status_code for r in results)
        assert 200 in codes and 429 in codes
        busy = next(r for r in results if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"
    finally:
        eng.shutdown()


async def test_models_tokenize_detokenize_version_docs(client, engine):
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL_NAME
    tok = (await client.post("/tokenize", json={"prompt": "hello there"})).json()
    assert tok["tokens"] == engine.engine.tokenizer.encode("hello there") and tok["count"] == len(tok["tokens"])
    chat = (await client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})).json()
    assert chat["tokens"] == engine.engine.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    text = (await client.post("/detokenize", json={"tokens": tok["tokens"]})).json()
    assert text["prompt"] == "hello there"
    assert (await client.post("/detokenize", json={"tokens": [-1]})).status_code == 400
    assert (await client.post("/tokenize", json={})).status_code == 400
    version = (await client.get("/version")).json()
    assert "version" in version and version["kernels"] == engine.kernels  # {"backend": ..., "variant": ...}
    assert version["kernels"]["backend"] in ("native", "torch")
    assert "/v1/chat/completions" in (await client.get("/openapi.json")).json()["paths"]


async def test_metrics_exposed(client):
    await client.post("/v1/completions", json={"prompt": "metrics please", "max_tokens": 3, "ignore_eos": True})
    text = (await client.get("/metrics")).text
    for name in ("workmem_kv_blocks_total", "workmem_kv_blocks_used", "workmem_kv_blocks_cached",
                 "workmem_num_requests_running", "workmem_num_requests_waiting",
                 "workmem_num_preemptions_total", "workmem_prefix_cache_queries_total",
                 "workmem_prefix_cache_hits_total", "workmem_prompt_tokens_total",
                 "workmem_generation_tokens_total"):
        metric(text, name)
    assert metric(text, "workmem_generation_tokens_total") >= 3
    assert metric(text, "workmem_kv_blocks_total") == 64
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert f"workmem_{name}_count" in text
    assert 'workmem_request_success_total{finished_reason="length"}' in text


async def test_engine_busy_and_idle_seconds_grow(client):
    def engine_seconds(text: str) -> tuple[float, float]:
        return metric(text, "workmem_engine_step_seconds_total"), metric(text, "workmem_engine_idle_seconds_total")

    step0, idle0 = engine_seconds((await client.get("/metrics")).text)
    r = await client.post("/v1/completions", json={"prompt": "time me", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200
    step1, _ = engine_seconds((await client.get("/metrics")).text)
    assert step1 > step0  # the request's first steps are published before its last output
    for _ in range(40):  # the idle wait is counted when it ends (at most IDLE_WAIT_S later)
        _, idle1 = engine_seconds((await client.get("/metrics")).text)
        if idle1 > idle0:
            break
        await asyncio.sleep(0.05)
    assert idle1 > idle0


async def test_health_503_while_loading_and_after_load_failure():
    from server.api.app import create_app
    from server.api.state import ServerSettings

    def never_ready():
        raise RuntimeError("weights are corrupt")

    app = create_app(ServerSettings(served_model_name="m"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/health")
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        r = await c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503
        state = app.state.workmem
        state.load_in_background(never_ready).join()
        r = await c.get("/health")
        assert r.status_code == 503 and "weights are corrupt" in r.json()["error"]["message"]


STREAM_BODIES = {  # each streaming protocol's path and a long body
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60,
                             "ignore_eos": True, "stream": True},
    "/v1/responses": {"input": "hi", "max_output_tokens": 60, "store": False, "stream": True},
    "/v1/messages": {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
                     "max_tokens": 60, "stream": True},
}


@pytest.mark.parametrize("path", list(STREAM_BODIES))
async def test_a_client_leaving_while_a_chunk_is_sent_leaves_no_failed_task(engine, path):
    """The client leaves while the server writes its third chunk: the write is cancelled with
    the stream's body generator suspended at a `yield`, so the body and the generators under
    it are closed by garbage collection. Closing them must still abort the request, and no
    task may fail ('aclose(): asynchronous generator is already running', which the soak saw
    once per vanished client)."""
    app, loop = make_app(engine), asyncio.get_running_loop()
    failures: list[dict] = []
    old_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: failures.append(context))
    chunks, left = 0, asyncio.Event()

    async def receive() -> dict:
        if not getattr(receive, "sent", False):
            receive.sent = True
            return {"type": "http.request", "body": json.dumps(STREAM_BODIES[path]).encode(), "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal chunks
        if message["type"] == "http.response.body" and message.get("body"):
            chunks += 1
            if chunks == 3:
                left.set()
                await asyncio.Event().wait()  # the write never finishes: cancelled by the disconnect

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    try:
        await asyncio.wait_for(app(scope, receive, send), 30)
        assert chunks == 3
        for _ in range(50):  # let the finaliser tasks run
            gc.collect()
            await asyncio.sleep(0.01)
            if not engine.stats.num_running and not engine.stats.num_waiting:
                break
    finally:
        loop.set_exception_handler(old_handler)
    assert (engine.stats.num_running, engine.stats.num_waiting) == (0, 0)  # the request was aborted
    assert not failures, [f.get("message") + ": " + repr(f.get("exception")) for f in failures]
