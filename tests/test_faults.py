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
        for _ in range(100):  # stats are published after the step that delivered the last token
            if engine.stats.kv_blocks_used == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.stats.kv_blocks_used == 0  # the failed requests' blocks came back
    finally:
        engine.shutdown()


async def test_a_reader_that_falls_behind_is_cut_off(tiny_checkpoint):
    from model.sampling import SamplingParams
    from server.async_engine import AsyncEngine, SlowReaderError
    from server.engine import EngineConfig, LLMEngine

    config = EngineConfig(model=str(tiny_checkpoint("llama")), dtype="float32", device="cpu", max_model_len=256,
                          num_kv_blocks=64, block_size=8)
    engine = AsyncEngine(LLMEngine(config), max_pending=4)
    reasons: dict[str, str] = {}
    engine.step_listeners.append(lambda outs: reasons.update({o.request_id: o.finish_reason for o in outs if o.finished}))
    engine.start()
    try:
        stream = engine.generate("slow", [1, 2, 3], SamplingParams(max_tokens=250, ignore_eos=True))
        await anext(stream)
        await asyncio.sleep(0.05)  # the engine runs on; this reader does not (4 outputs fill its queue)
        with pytest.raises(SlowReaderError):
            async for _ in stream:
                pass
        for _ in range(200):  # the abort reaches the engine thread within a step
            if engine.stats.num_running == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.stats.num_running == 0 and "slow" not in reasons  # aborted, never ran to its 250 tokens
        fresh = [o async for o in engine.generate("ok", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))]
        assert sum(len(o.new_token_ids) for o in fresh) == 3
    finally:
        engine.shutdown()


async def test_a_request_that_fails_inside_add_request_fails_alone(tiny_checkpoint):
    """An error that is no ValueError while a request is added (here: queueing it) fails that
    request; the engine thread does not die of it."""
    from model.sampling import SamplingParams

    engine = start_engine(tiny_checkpoint("llama"), max_model_len=128, num_kv_blocks=64, block_size=8)
    scheduler = engine.engine.scheduler
    real_add = scheduler.add

    def add(seqs):
        if seqs[0].request_id == "bad":
            raise OSError("injected fault")
        real_add(seqs)

    scheduler.add = add
    try:
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        with pytest.raises(RuntimeError, match="injected fault"):
            async for _ in engine.generate("bad", [1, 2, 3], params):
                pass
        assert engine.is_alive
        good = [o async for o in engine.generate("good", [1, 2, 3], params)]
        assert sum(len(o.new_token_ids) for o in good) == 3
    finally:
        engine.shutdown()


async def test_a_lost_rank_inside_a_step_stops_the_engine(tiny_checkpoint):
    """RankLostError out of a step is not one step's failure (the 'fail what was in flight,
    keep serving' path): the engine thread stops, its requests get EngineDeadError, /health
    would say 503."""
    from model.parallel import RankLostError
    from model.sampling import SamplingParams
    from server.async_engine import EngineDeadError

    engine = start_engine(tiny_checkpoint("llama"), max_model_len=128, num_kv_blocks=64, block_size=8)

    def lost_step():
        raise RankLostError("injected: rank 1 gone")

    engine.engine.step = lost_step
    try:
        with pytest.raises(EngineDeadError, match="rank 1 gone"):
            async for _ in engine.generate("a", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True)):
                pass
        await asyncio.to_thread(engine._thread.join, 30)
        assert not engine.is_alive and isinstance(engine.error, RankLostError)
    finally:
        engine.shutdown()
