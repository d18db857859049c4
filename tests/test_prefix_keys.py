"""Prefix-cache keys (issue 13): SHA-256 block hashes rooted in the model's identity and the
request's cache salt; stable across processes; no built-in `hash` anywhere on the path."""
from __future__ import annotations

import builtins
import subprocess
import sys

import httpx
import pytest

from model.sampling import SamplingParams
from server.engine import LLM
from server.engine.memory import NO_PARENT, block_hash, root_hash
from tests.server_fixtures import make_app, start_engine

ENGINE = dict(max_model_len=128, num_kv_blocks=64, block_size=8)


def test_block_hashes_are_sha256_and_the_same_in_every_process():
    here = block_hash(root_hash("model-a"), [1, 2, 3, 4])
    code = "from server.engine.memory import block_hash, root_hash; print(block_hash(root_hash('model-a'), [1, 2, 3, 4]))"
    there = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert here == there and here.bit_length() > 64
    assert root_hash("model-a") != root_hash("model-b") != root_hash("model-a", "tenant")
    assert block_hash(NO_PARENT, [1, 2, 3, 4]) != block_hash(NO_PARENT, [1, 2, 3, 5])


def test_blocks_with_equal_builtin_hashes_never_share_kv(tiny_checkpoint, monkeypatch):
    llm = LLM(str(tiny_checkpoint("llama")), dtype="float32", device="cpu", **ENGINE)
    monkeypatch.setattr(builtins, "hash", lambda _: 42)  # every built-in hash collides now
    first, second = [5, 6, 7, 8, 9, 10, 11, 12, 13], [6, 5, 7, 8, 9, 10, 11, 12, 13]  # one full block each
    params = SamplingParams(temperature=0, max_tokens=2)
    llm.generate([first], params)
    (out,) = llm.generate([second], params)
    assert out.num_cached_tokens == 0  # a different block is never a cache hit
    (again,) = llm.generate([first], params)
    assert again.num_cached_tokens == 8  # while the same one still is


@pytest.mark.asyncio
async def test_cache_salt_keeps_tenants_prefixes_apart(tiny_checkpoint):
    engine = start_engine(tiny_checkpoint("llama"), **ENGINE)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(engine)), base_url="http://t") as c:
            async def cached(salt: str | None) -> int:
                body = {"prompt": list(range(20, 40)), "max_tokens": 1, **({"cache_salt": salt} if salt else {})}
                r = await c.post("/v1/completions", json=body)
                return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

            assert await cached("tenant-a") == 0
            assert await cached("tenant-a") == 16  # two full blocks, reused within the tenant
            assert await cached("tenant-b") == 0  # never across tenants
            assert await cached(None) == 0  # nor with unsalted requests
            r = await c.post("/v1/completions", json={"prompt": "x", "cache_salt": ""})
            assert r.status_code == 400
    finally:
        engine.shutdown()
