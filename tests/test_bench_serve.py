"""`python -m loadtest` (= `workmem bench serve`) against real uvicorn servers on loopback
over the tiny llama: its counts agree with the server's own counters, sessions go through
/v1/sessions (or resend the history where there is none), failing servers are reported
rather than raised, and --compare / --sweep-rate / --plot produce their tables and files.
Small runs (a few requests of a few tokens); no timed assertions."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from loadtest.cli import main as bench_main
from loadtest.http import main as http_main
from loadtest.scrape import parse_prometheus
from server.cli import main as workmem_main
from tests.server_fixtures import (
    MODEL_NAME,
    free_port,
    live_server,
    make_app,
    running_engine,
)

ENGINE = {"max_model_len": 256, "num_kv_blocks": 96, "block_size": 8}
SMALL = ["--input-len", "6", "--output-len", "5", "--warmup", "0", "--no-progress"]
OUTPUT_LEN = 5


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    with running_engine(tiny_checkpoint("llama"), **ENGINE) as eng:
        yield eng


@pytest.fixture(scope="module")
def url(engine):
    with live_server(make_app(engine)) as base:
        yield base


def counters(base: str) -> dict[str, float]:
    return parse_prometheus(httpx.get(base + "/metrics", timeout=30).text)


def bench(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "result.json"
    rc = bench_main([*args, *SMALL, "--out", str(out)])
    return rc, json.loads(out.read_text())


def assert_ordered(result: dict) -> None:
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = result[key]
        assert s["p50"] <= s["p90"] <= s["p99"] <= s["max"], (key, s)
        assert 0 < s["mean"] <= s["max"], (key, s)


def test_counts_match_the_servers_counters(url, tmp_path):
    before = counters(url)
    rc, r = bench(tmp_path, "--url", url, "--num-requests", "6", "--concurrency", "3", "--slo", "e2e_ms=1e9")
    after = counters(url)
    assert rc == 0 and (r["completed"], r["failed"], r["errors"]) == (6, 0, [])
    assert r["model"] == MODEL_NAME and r["token_counts_from"] == "usage"
    generated = after["workmem_generation_tokens_total"] - before["workmem_generation_tokens_total"]
    assert r["total_output_tokens"] == generated == 6 * OUTPUT_LEN
    prompt = after["workmem_prompt_tokens_total"] - before["workmem_prompt_tokens_total"]
    assert r["total_input_tokens"] == prompt > 0
    assert_ordered(r)
    assert r["goodput"] == pytest.approx(r["request_throughput"])
    assert r["output_throughput"] == pytest.approx(generated / r["duration_s"])
    server = r["server_metrics"]
    assert server["counters_delta"]["workmem_generation_tokens_total"] == generated
    assert len(server["series"]["t_s"]) == len(server["series"]["kv_usage"]) >= 2
    assert r["parameters"]["num_requests"] == 6 and "api_key" not in r["parameters"]
    assert len(r["requests"]) == 6 and all(q["output_tokens"] == OUTPUT_LEN for q in r["requests"])


def test_chat_shared_prefix_hits_the_prefix_cache(url, tmp_path):
    rc, r = bench(tmp_path, "--url", url, "--endpoint", "chat", "--workload", "shared-prefix",
                  "--shared-prefix-len", "24", "--num-requests", "3", "--concurrency", "1")
    assert rc == 0 and r["completed"] == 3 and r["endpoint"] == "chat"
    assert r["total_output_tokens"] == 3 * OUTPUT_LEN and r["total_cached_tokens"] > 0


def test_sessions_workload_uses_the_session_api(url, tmp_path):
    before = counters(url)["workmem_sessions_active"]
    rc, r = bench(tmp_path, "--url", url, "--workload", "sessions", "--num-sessions", "2", "--turns", "3",
                  "--concurrency", "2", "--keep-sessions")
    assert rc == 0 and r["session_mode"] == "sessions-api" and r["completed"] == 6
    assert r["endpoint"] == "chat" and "/v1/sessions/{id}" in r["notes"][0]
    assert counters(url)["workmem_sessions_active"] == before + 2
    kept = [s for s in httpx.get(url + "/v1/sessions").json()["data"] if s["num_turns"] == 3]
    assert len(kept) == 2
    turns = r["ttft_ms_by_turn"]
    assert [t["turn"] for t in turns] == [1, 2, 3] and all(t["requests"] == 2 for t in turns)
    assert all(t["cached_tokens_mean"] > 0 for t in turns[1:])  # the history stayed resident
    for s in kept:
        assert httpx.delete(f"{url}/v1/sessions/{s['id']}").status_code == 200
    rc, r = bench(tmp_path, "--url", url, "--workload", "sessions", "--num-sessions", "1", "--turns", "2")
    assert rc == 0 and r["completed"] == 2
    assert counters(url)["workmem_sessions_active"] == before  # deleted afterwards


def without_sessions(app):
    """`app` as a server without workmem's session API: /v1/sessions* answer 404."""
    async def wrapped(scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/sessions"):
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"error": {"message": "Not Found"}}'})
            return
        await app(scope, receive, send)
    return wrapped


def test_sessions_resend_the_history_without_a_session_api(engine, tmp_path):
    with live_server(without_sessions(make_app(engine))) as base:
        rc, r = bench(tmp_path, "--url", base, "--workload", "sessions", "--num-sessions", "1", "--turns", "3")
    assert rc == 0 and r["session_mode"] == "history" and r["completed"] == 3
    assert "no /v1/sessions" in r["notes"][0]
    prompts = [t["prompt_tokens_mean"] for t in r["ttft_ms_by_turn"]]
    assert prompts[0] < prompts[1] < prompts[2]  # every turn carries the whole history


async def broken_stream_app(scope, receive, send):
    """Healthy, then every completion stream breaks after its first event."""
    if scope["type"] == "lifespan":
        while True:
            if (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] != "/v1/completions":
        status, body = (200, b'{"status": "ok"}') if scope["path"] == "/health" else (404, b"{}")
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": b'data: {"choices": [{"text": "x"}]}\n\n', "more_body": True})
    # returns without finishing the body: the server drops the connection


def test_failing_servers_are_reported_not_raised(url, tmp_path, capsys):
    with live_server(broken_stream_app) as broken:
        dead = f"http://127.0.0.1:{free_port()}"  # picked while `broken` holds its port: never the same one
        rc, r = bench(tmp_path, "--url", url, "--name", "wrong-model", "--model", "no-such-model",
                      "--compare", f"{dead}=refused", f"{broken}=broken", "--num-requests", "2")
    assert rc == 1
    runs = {x["name"]: x for x in r["compare"]}
    assert [x["name"] for x in r["compare"]] == ["wrong-model", "refused", "broken"]
    assert all(x["failed"] == 2 and x["completed"] == 0 for x in runs.values())
    assert runs["wrong-model"]["errors"][0].startswith("HTTP 404")
    assert "ConnectError" in runs["refused"]["errors"][0]
    assert "RemoteProtocolError" in runs["broken"]["errors"][0]
    captured = capsys.readouterr()
    assert "refused: 2 failed; first error: ConnectError" in captured.out
    assert "Traceback" not in captured.out + captured.err
    assert workmem_main(["bench", "serve", "--url", dead, "--num-requests", "1", *SMALL]) == 1


def test_compare_two_live_servers_prints_both_and_plots(engine, url, tmp_path, capsys):
    png = tmp_path / "bench.png"
    with live_server(make_app(engine)) as second:
        rc, r = bench(tmp_path, "--url", url, "--name", "first", "--compare", f"{second}=second",
                      "--num-requests", "3", "--concurrency", "3", "--plot", str(png))
    out = capsys.readouterr().out
    assert rc == 0 and [x["name"] for x in r["compare"]] == ["first", "second"]
    assert all(x["completed"] == 3 and x["total_output_tokens"] == 3 * OUTPUT_LEN for x in r["compare"])
    assert "second / first" in out and "1x" in out  # the output-token ratio
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_sweep_rate_and_the_old_http_flags(url, tmp_path):
    png = tmp_path / "sweep.png"
    rc, r = bench(tmp_path, "--url", url, "--sweep-rate", "100,inf", "--num-requests", "2", "--plot", str(png))
    assert rc == 0 and r["rates"] == [100.0, float("inf")]
    assert [x["name"] for x in r["sweep"]] == ["100 req/s", "inf req/s"]
    assert [x["parameters"]["request_rate"] for x in r["sweep"]] == [100.0, None]
    assert all(x["completed"] == 2 for x in r["sweep"]) and png.read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "http.json"
    assert http_main(["--url", url, "--concurrency", "2", "--requests", "2", "--max-tokens", "3",
                      "--prompt-repeats", "1", "--json", str(out), "--no-progress"]) == 0
    legacy = json.loads(out.read_text())
    assert legacy["completed"] == 2 and legacy["total_output_tokens"] == 6


def test_duration_bounds_an_open_ended_run(url, tmp_path):
    rc, r = bench(tmp_path, "--url", url, "--duration", "0.5", "--concurrency", "2")
    assert rc == 0 and r["failed"] == 0 and r["completed"] >= 1
    assert r["parameters"]["num_requests"] is None and r["parameters"]["duration_s"] == 0.5
    assert r["total_output_tokens"] == r["completed"] * OUTPUT_LEN
