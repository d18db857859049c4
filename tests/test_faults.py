"""Fault isolation (issue 10): a failure while handling one request fails that request
with a JSON error (or a final SSE error event) and leaves the others running."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.server_fixtures import make_app, start_engine

pytestmark = pytest.mark.asyncio
POISON = [7, 7, 7, 7]  # prompts starting with these ids fail inside the engine


def _poison_hook(seq) -> None:
    if seq.token_ids[: len(POISON)] == POISON and seq.num_output_tokens >= 2:
        raise RuntimeError("injected fault while handling this request")


async def test_a_failing_request_fails_alone(tiny_checkpoint):
    engine = start_engine(tiny_checkpoint("llama"), max_model_len=128, num_kv_blocks=64, block_size=8)
    engine.engine.fault_hook = _poison_hook
    try:
        app = make_app(engine)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            good = {"prompt": [1, 2, 3], "max_tokens": 40, "ignore_eos": True}
            bad = {"prompt": POISON + [1], "max_tokens": 40, "ignore_eos": True}
            results = await asyncio.gather(
                c.post("/v1/completions", json=good), c.post("/v1/completions", json=bad),
                c.post("/v1/completions", json={**bad, "stream": True}), c.post("/v1/completions", json=good),
            )
            ok1, failed, streamed, ok2 = results
            assert ok1.status_code == ok2.status_code == 200
            assert ok1.json()["usage"]["completion_tokens"] == ok2.json()["usage"]["completion_tokens"] == 40
            assert failed.status_code == 500 and failed.json()["error"]["code"] == "request_failed"
            assert "injected fault" in failed.json()["error"]["message"]
            events = [e[6:] for e in streamed.text.split("\n\n") if e.startswith("data: ")]
            assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_failed"
            assert (await c.get("/health")).status_code == 200
            again = await c.post("/v1/completions", json=good)  # the engine serves on
            assert again.status_code == 200
        assert engine.stats.kv_blocks_used == 0  # the failed requests' blocks came back
    finally:
        engine.shutdown()
