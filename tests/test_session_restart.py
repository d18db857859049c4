"""A real server process with --session-dir: a session survives kill -9 (every completed
turn was durable before its response finished) and continues with the same tokens as a
session that never went through a restart."""
from __future__ import annotations

import httpx

from tests.test_live_server import _start, _stop

TURNS = ["Hello there, how are you?", "Tell me about memory.", "And about caches?"]
PARAMS = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


def turn(url: str, sid: str, text: str) -> dict:
    r = httpx.post(f"{url}/v1/sessions/{sid}/chat/completions",
                   json={"messages": [{"role": "user", "content": text}], **PARAMS}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_session_survives_kill_9_and_continues_identically(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama")
    session_dir = tmp_path / "sessions"
    flags = ("--session-dir", str(session_dir))

    reference = _start(model, tmp_path / "reference.log")
    try:
        sid = httpx.post(f"{reference.url}/v1/sessions", json={"messages": [{"role": "system", "content": "hi"}]}).json()["id"]
        expected = [turn(reference.url, sid, t)["choices"][0]["message"]["content"] for t in TURNS]
    finally:
        _stop(reference)

    first = _start(model, tmp_path / "first.log", flags)
    sid = httpx.post(f"{first.url}/v1/sessions", json={"messages": [{"role": "system", "content": "hi"}]}).json()["id"]
    got = [turn(first.url, sid, t)["choices"][0]["message"]["content"] for t in TURNS[:2]]
    first.proc.kill()  # kill -9: no shutdown hook runs
    first.proc.wait()
    assert got == expected[:2]

    second = _start(model, tmp_path / "second.log", flags)
    try:
        info = httpx.get(f"{second.url}/v1/sessions/{sid}").json()
        assert info["num_turns"] == 2 and info["tier"] == "dropped"
        assert [m["content"] for m in info["messages"] if m["role"] == "assistant"] == expected[:2]
        third = turn(second.url, sid, TURNS[2])
        assert third["choices"][0]["message"]["content"] == expected[2]
        metrics = httpx.get(f"{second.url}/metrics").text
        assert 'workmem_session_restores_total{source="recompute"} 1.0' in metrics
        (session_dir / "sess_corrupt.session.json").write_text("garbage")
    finally:
        _stop(second)

    third_server = _start(model, tmp_path / "third.log", flags)
    try:
        r = httpx.get(f"{third_server.url}/v1/sessions/sess_corrupt")
        assert r.status_code == 422 and r.json()["error"]["code"] == "session_corrupt"
        info = httpx.get(f"{third_server.url}/v1/sessions/{sid}").json()
        assert info["num_turns"] == 3
        assert info["tier"] == "offloaded"  # SIGTERM saved its KV: the next turn reads it back
    finally:
        _stop(third_server)
