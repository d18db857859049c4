"""loadtest/baselines/naive_hf.py: the transformers baseline server streams one chunk per
token with usage, and its greedy tokens are transformers' own (it is the reference run)."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from loadtest.baselines.naive_hf import create_app, load

pytestmark = pytest.mark.asyncio


async def test_streams_greedy_tokens_with_usage(tiny_checkpoint):
    tok, lm = load(str(tiny_checkpoint("llama")), torch.float32)
    app = create_app(tok, lm, "tiny")
    body = {"prompt": "hello world", "max_tokens": 6, "temperature": 0, "stream": True, "ignore_eos": True}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/v1/models")).json()["data"][0]["id"] == "tiny"
        r = await c.post("/v1/completions", json=body)
        plain = (await c.post("/v1/completions", json={**body, "stream": False})).json()
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 6 and len(chunks) == 7
    streamed = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    ids = tok("hello world")["input_ids"]
    want = lm.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, len(ids):]
    assert plain["choices"][0]["text"] == tok.decode(want) and plain["usage"]["completion_tokens"] == 6
    assert streamed == "".join(tok.decode([t]) for t in want.tolist())
