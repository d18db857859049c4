"""A real `python -m server serve` process on a loopback port, driven by the official
`openai` SDK, raw httpx and workmem's own client.

One server serves the whole module with --max-num-seqs 3, so a 4th concurrent request queues.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from model.sampling import SamplingParams
from tests.server_fixtures import free_port, metric

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"
MAX_MODEL_LEN = 256
MAX_NUM_SEQS = 3  # n=3 fits; a 4th concurrent request queues
BLOCK_SIZE = 16
STARTUP_TIMEOUT_S = 120
STOP_TIMEOUT_S = 15
N_TIMEOUT_S = 20  # n > 1 requests: fail fast rather than hang if a choice never finishes
IDLE_TIMEOUT_S = 5
MSGS = [{"role": "user", "content": "The quick brown fox"}]
PROMPT = "Working memory holds the conversation;"
GAUGES = ("workmem_kv_blocks_used", "workmem_num_requests_running", "workmem_num_requests_waiting")


@dataclass
class LiveServer:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _start(model_dir: Path, log_path: Path, extra: tuple[str, ...] = ()) -> LiveServer:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKMEM_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "server", "serve", "--model", str(model_dir), "--dtype", "float32",
        "--device", "cpu", "--port", str(port), "--served-model-name", MODEL,
        "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "64", "--block-size", str(BLOCK_SIZE),
        "--max-num-seqs", str(MAX_NUM_SEQS), *extra,
    ]
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    srv = LiveServer(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} during start-up:\n{srv.log()}")
        try:
            status = httpx.get(srv.url + "/health", timeout=2).status_code
        except httpx.HTTPError:
            status = None
        if status == 200:
            return srv
        time.sleep(0.1)
    _stop(srv)
    pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{srv.log()}")


def _stop(srv: LiveServer) -> int:
    if srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait()
    return srv.proc.returncode


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory, request):
    srv = _start(tiny_checkpoint("llama"), tmp_path_factory.mktemp("live") / "server.log")
    failed_before = request.session.testsfailed
    yield srv
    _stop(srv)
    if request.session.testsfailed > failed_before:
        capman = request.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled():
            print(f"\n---- live server log ({srv.log_path}) ----\n{srv.log()[-20000:]}", file=sys.stderr)


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def offline(tiny_checkpoint):
    from server.engine import LLM

    return LLM(str(tiny_checkpoint("llama")), dtype="float32", device="cpu",
               max_model_len=MAX_MODEL_LEN, num_kv_blocks=64)


def tokenize(srv: LiveServer, **body) -> list[int]:
    r = httpx.post(srv.url + "/tokenize", json=body, timeout=30)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["count"] == len(data["tokens"]) and data["max_model_len"] == MAX_MODEL_LEN
    return data["tokens"]


def gauges(srv: LiveServer) -> dict[str, float]:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    return {name: metric(text, name) for name in GAUGES}


def wait_idle(srv: LiveServer, timeout: float = IDLE_TIMEOUT_S) -> float:
    """Seconds until every gauge in GAUGES reads 0; fails with the last reading otherwise."""
    start = time.monotonic()
    while True:
        g = gauges(srv)
        if not any(g.values()):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            pytest.fail(f"engine not idle {timeout} s after the clients left: {g}")
        time.sleep(0.05)


def greedy_ref(offline, ids: list[int], max_tokens: int = 16, **kw):
    out = offline.generate([ids], SamplingParams(temperature=0, max_tokens=max_tokens, **kw))[0]
    return out.outputs[0]


# -- process ----------------------------------------------------------------------------
def test_health_models_and_metrics(server, oai):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in oai.models.list().data] == [MODEL]
    g = gauges(server)
    assert g["workmem_kv_blocks_used"] == 0
    assert metric(httpx.get(server.url + "/metrics").text, "workmem_kv_blocks_total") == 64


# -- chat -------------------------------------------------------------------------------
def test_chat_non_streaming(server, oai):
    ids = tokenize(server, messages=MSGS)
    r = oai.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(ids)
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 12


def test_chat_streaming_matches_non_streaming(server, oai):
    kw = dict(model=MODEL, messages=MSGS, max_tokens=12, temperature=0)
    whole = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    body, last = chunks[:-1], chunks[-1]
    assert all(len(c.choices) == 1 and c.choices[0].index == 0 and c.usage is None for c in body)
    assert body[0].choices[0].delta.role == "assistant"
    reasons = [c.choices[0].finish_reason for c in body]
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content
    # the usage chunk comes last, with no choices
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.total_tokens == whole.usage.total_tokens


def test_chat_streaming_without_usage_option_sends_no_usage(server, oai):
    chunks = list(oai.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=4, temperature=0, stream=True))
    assert chunks and all(c.usage is None and len(c.choices) == 1 for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


# -- completions ------------------------------------------------------------------------
def test_completion_non_streaming_and_streaming(server, oai):
    ids = tokenize(server, prompt=PROMPT)
    whole = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert len(whole.choices) == 1 and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == len(ids) and 1 <= whole.usage.completion_tokens <= 10
    chunks = list(oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    body, last = chunks[:-1], chunks[-1]
    assert all(len(c.choices) == 1 and c.usage is None for c in body)
    assert "".join(c.choices[0].text for c in body) == whole.choices[0].text
    reasons = [c.choices[0].finish_reason for c in body]
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == len(ids)


def test_completion_default_max_tokens_is_16(server, oai):
    r = oai.completions.create(model=MODEL, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


# -- n, seeds, logprobs -----------------------------------------------------------------
def test_chat_n3_seeded_is_reproducible(server, oai):
    kw = dict(model=MODEL, messages=MSGS, max_tokens=8, temperature=1.0, seed=1234, n=3)
    fast = oai.with_options(timeout=N_TIMEOUT_S)
    a, b = fast.chat.completions.create(**kw), fast.chat.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    texts_a = {c.index: c.message.content for c in a.choices}
    texts_b = {c.index: c.message.content for c in b.choices}
    assert texts_a == texts_b  # same seed, same completions
    assert len(set(texts_a.values())) > 1  # the n siblings do not share one random stream
    assert a.usage.prompt_tokens == len(tokenize(server, messages=MSGS))  # counted once, not n times


def test_completion_n3_usage_counts_every_choice(server, oai):
    r = oai.with_options(timeout=N_TIMEOUT_S).completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.8, seed=7, n=3, logprobs=0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    for c in r.choices:
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)


def test_completion_logprobs_shape(server, oai):
    r = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0
        assert 1 <= len(top) <= 2  # top-2, keyed by text (two tokens may decode alike)
        if len(top) == 2:  # greedy: the sampled token is the most likely one
            assert top[token] == pytest.approx(logprob) == max(top.values())
    assert any(len(top) == 2 for top in lp.top_logprobs)


def test_chat_logprobs_shape(server, oai):
    r = oai.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8, temperature=1.0, seed=3,
                                    logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6
        assert bytes(entry.bytes).decode(errors="replace") == entry.token
    plain = oai.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


# -- parity with the offline engine -----------------------------------------------------
def test_greedy_chat_matches_offline_engine(server, oai, offline):
    ids = tokenize(server, messages=MSGS)
    ref = greedy_ref(offline, ids)
    r = oai.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].finish_reason == ref.finish_reason


def test_greedy_completion_matches_offline_engine(server, oai, offline):
    ids = tokenize(server, prompt=PROMPT)
    ref = greedy_ref(offline, ids)
    for prompt in (PROMPT, [ids], ids):
        r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
        assert r.choices[0].text == ref.text, prompt
        assert r.usage.completion_tokens == len(ref.token_ids), prompt
        assert r.usage.prompt_tokens == len(ids), prompt
        assert r.choices[0].finish_reason == ref.finish_reason, prompt


# -- errors -----------------------------------------------------------------------------
def test_negative_temperature_is_bad_request(server, oai):
    with pytest.raises(openai.BadRequestError) as chat_err:
        oai.chat.completions.create(model=MODEL, messages=MSGS, temperature=-1)
    assert chat_err.value.status_code == 400 and "temperature" in chat_err.value.message
    with pytest.raises(openai.BadRequestError) as cmpl_err:
        oai.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
    assert cmpl_err.value.body["param"] == "temperature"


def test_prompt_longer_than_context_is_bad_request(server, oai):
    long_ids = [i % 300 for i in range(300)]
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=MODEL, prompt=[long_ids], max_tokens=4)
    assert str(MAX_MODEL_LEN) in err.value.message and "300" in err.value.message
    assert err.value.code == "context_length_exceeded"
    messages = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 40}]
    n = len(tokenize(server, messages=messages))
    assert n > MAX_MODEL_LEN
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert str(MAX_MODEL_LEN) in err.value.message and str(n) in err.value.message


def test_max_tokens_past_context_is_bad_request(server, oai):
    n = len(tokenize(server, prompt=PROMPT))
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_MODEL_LEN)
    assert str(MAX_MODEL_LEN) in err.value.message and str(n) in err.value.message


def test_unknown_model_is_not_found(server, oai):
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="no-such-model", messages=MSGS, max_tokens=2)
    assert "no-such-model" in err.value.message and err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)


# -- client disconnects -----------------------------------------------------------------
LONG_MSGS = [{"role": "user", "content": "def add(a, b): return a + b"}]
LONG_BODY = {"model": MODEL, "messages": LONG_MSGS, "max_tokens": 200, "temperature": 0,
             "ignore_eos": True, "stream": True}


def _probe_cached(oai, prompt_ids: list[int], generated: list[int]) -> int:
    """Prompt tokens the prefix cache serves for the prompt + `generated` (as one prompt)."""
    r = oai.completions.create(model=MODEL, prompt=[prompt_ids + generated], max_tokens=1, temperature=0)
    return r.usage.prompt_tokens_details.cached_tokens


def test_disconnect_mid_stream_aborts_the_request(server, oai, offline):
    ids = tokenize(server, messages=LONG_MSGS)
    ref = greedy_ref(offline, ids, max_tokens=200, ignore_eos=True)
    assert len(ref.token_ids) == 200
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=LONG_BODY) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            events, lines = [], resp.iter_lines()  # keep the iterator: dropping it closes the connection
            while len(events) < 2:
                line = next(lines)
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
            busy = gauges(server)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert busy["workmem_num_requests_running"] == 1 and busy["workmem_kv_blocks_used"] > 0
    wait_idle(server)
    # The engine stopped early: it never computed the KV of the prompt + its first 160 greedy
    # tokens, so the prefix cache lacks at least that probe's last block... (How many tokens
    # a disconnect takes to land depends on the machine: 83 on a loaded one, so the bound is
    # the probe's end, not a share of it.)
    assert _probe_cached(oai, ids, ref.token_ids[:160]) < len(ids) + 160 - BLOCK_SIZE
    # ...whereas the request run to the end leaves them cached. (Probe further than the first
    # probe went, since that probe cached its own prompt's blocks.)
    done = oai.chat.completions.create(model=MODEL, messages=LONG_MSGS, max_tokens=200, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 200 and done.choices[0].message.content == ref.text
    assert _probe_cached(oai, ids, ref.token_ids[:192]) >= len(ids) + 192 - BLOCK_SIZE


async def _stream_until_cancelled(url: str, body: dict, started: asyncio.Event) -> None:
    """Read the stream until cancelled; cancelling closes the connection."""
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    started.set()


@pytest.mark.asyncio
async def test_disconnect_running_and_queued_streams_frees_everything(server):
    # 4 long requests on 3 sequence slots: three run, one waits. Each has its own prompt, so
    # afterwards the prefix cache tells which ones ever ran.
    messages = [[{"role": "user", "content": f"Request {i}: the quick brown fox jumps over the lazy dog."}]
                for i in range(4)]
    prompts = [await asyncio.to_thread(tokenize, server, messages=m) for m in messages]
    assert min(map(len, prompts)) >= 16  # at least one full (cacheable) block each
    starts = [asyncio.Event() for _ in range(4)]
    tasks = []
    for i in range(4):
        body = {**LONG_BODY, "messages": messages[i], "temperature": 1.0, "seed": i,
                "max_tokens": MAX_MODEL_LEN - len(prompts[i])}
        tasks.append(asyncio.create_task(_stream_until_cancelled(server.url, body, starts[i])))
    deadline = time.monotonic() + 30
    while sum(s.is_set() for s in starts) < MAX_NUM_SEQS and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    busy = await asyncio.to_thread(gauges, server)
    ran = [i for i in range(4) if starts[i].is_set()]
    queued = [t for i, t in enumerate(tasks) if i not in ran]
    try:
        assert len(ran) == MAX_NUM_SEQS, busy  # the 4th is queued: no response yet
        assert busy["workmem_num_requests_running"] == MAX_NUM_SEQS
        assert busy["workmem_num_requests_waiting"] == 1
        # The queued client leaves first (so no freed slot can admit it in the meantime):
        # it leaves the queue while the others keep running.
        for t in queued:
            t.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while (g := await asyncio.to_thread(gauges, server))["workmem_num_requests_waiting"]:
            assert time.monotonic() < deadline, g
            await asyncio.sleep(0.01)
        assert g["workmem_num_requests_running"] == MAX_NUM_SEQS, g
    finally:
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results), results
    await asyncio.to_thread(wait_idle, server)
    async with httpx.AsyncClient(timeout=60) as http:
        # the queued request was dropped before it ever ran: nothing of its prompt is cached
        for i, ids in enumerate(prompts):
            r = await http.post(server.url + "/v1/completions",
                                json={"model": MODEL, "prompt": ids, "max_tokens": 1, "temperature": 0})
            assert r.status_code == 200, r.text
            cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert (cached >= 16) == (i in ran), (i, ran, cached)
        # and the server still serves
        r = await http.post(server.url + "/v1/chat/completions",
                            json={"model": MODEL, "messages": MSGS, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert (await asyncio.to_thread(gauges, server))["workmem_kv_blocks_used"] == 0


@pytest.mark.asyncio
async def test_n_sequences_count_against_max_num_seqs(server):
    # Two n=2 requests on 3 sequence slots: a request's n sequences run together, so the
    # second must wait until the first is done; running never exceeds --max-num-seqs.
    starts = [asyncio.Event(), asyncio.Event()]
    tasks = [asyncio.create_task(_stream_until_cancelled(
        server.url, {**LONG_BODY, "n": 2, "temperature": 1.0, "seed": i}, starts[i])) for i in range(2)]
    try:
        deadline = time.monotonic() + 30
        while not any(s.is_set() for s in starts) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        # read at once: the first request's 200 tokens take well under a second now
        started_now = sum(s.is_set() for s in starts)
        g = await asyncio.to_thread(gauges, server)
        assert started_now == 1
        assert g["workmem_num_requests_running"] == 2 and g["workmem_num_requests_waiting"] == 1, g
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.to_thread(wait_idle, server)


# -- workmem's own client ---------------------------------------------------------------
def test_client_sync(server, oai):
    from client import BadRequestError, Client, NotFoundError, Usage

    ref = oai.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=10, temperature=0)
    with Client(server.url, max_retries=0) as c:
        assert c.health() is True
        assert c.models() == [MODEL]
        got = c.chat(MSGS, max_tokens=10, temperature=0)
        assert got.text == ref.choices[0].message.content and got.finish_reason == ref.choices[0].finish_reason
        assert got.usage.completion_tokens == ref.usage.completion_tokens
        assert got.usage.prompt_tokens == ref.usage.prompt_tokens
        items = list(c.stream_chat(MSGS, max_tokens=10, temperature=0))
        assert isinstance(items[-1], Usage) and all(isinstance(i, str) for i in items[:-1])
        assert "".join(items[:-1]) == got.text
        assert items[-1].completion_tokens == got.usage.completion_tokens
        comp = c.complete(PROMPT, max_tokens=6, temperature=0)
        ref_c = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
        assert comp.text == ref_c.choices[0].text and comp.usage.completion_tokens == ref_c.usage.completion_tokens
        with pytest.raises(BadRequestError) as err:
            c.chat(MSGS, temperature=-1)
        assert err.value.status == 400 and err.value.param == "temperature"
        with pytest.raises(NotFoundError):
            c.chat(MSGS, model="no-such-model", max_tokens=2)
    with Client(f"http://127.0.0.1:{free_port()}", max_retries=0) as dead:
        assert dead.health() is False


@pytest.mark.asyncio
async def test_client_async(server):
    from client import AsyncClient, BadRequestError, Usage

    async with AsyncClient(server.url, max_retries=0) as c:
        assert await c.health() is True
        assert await c.models() == [MODEL]
        got = await c.chat(MSGS, max_tokens=10, temperature=0)
        assert got.usage.completion_tokens >= 1 and got.finish_reason in ("stop", "length")
        items = [i async for i in c.stream_chat(MSGS, max_tokens=10, temperature=0)]
        assert isinstance(items[-1], Usage) and all(isinstance(i, str) for i in items[:-1])
        assert "".join(items[:-1]) == got.text
        assert items[-1].completion_tokens == got.usage.completion_tokens
        comp = await c.complete(PROMPT, max_tokens=6, temperature=0)
        assert comp.usage.completion_tokens >= 1 and comp.raw["object"] == "text_completion"
        with pytest.raises(BadRequestError) as err:
            await c.complete(PROMPT, temperature=-1)
        assert err.value.status == 400 and err.value.param == "temperature"
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", max_retries=0) as dead:
        assert await dead.health() is False


# -- shutdown (runs last: it stops the module's server) ---------------------------------
def test_sigterm_stops_the_server_cleanly(server):
    assert server.proc.poll() is None
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert _stop(server) in (0, -signal.SIGTERM), server.log()[-5000:]
    assert "Application shutdown complete" in server.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)
