"""Tensor parallelism on the CPU: two ranks over gloo on loopback (rank 0 spawns rank 1)
against the same checkpoint on one rank. Greedy tokens must be identical and logprobs within
1e-4 (float32: only the order of the all-reduced partial sums differs), offline and over a
real `workmem serve --tensor-parallel-size 2` (with a `workmem tp-worker` as rank 1); a follower killed with -9 turns /health to
503 and makes the server exit with EXIT_RANK_LOST instead of hanging."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from model.sampling import SamplingParams
from server.cli import EXIT_RANK_LOST
from server.engine import LLM
from tests.server_fixtures import free_port

REPO = Path(__file__).resolve().parents[1]
LOGPROB_TOL = 1e-4
MAX_MODEL_LEN = 256
ENGINE = dict(dtype="float32", device="cpu", num_kv_blocks=64, max_model_len=MAX_MODEL_LEN, num_threads=1)
PROMPTS = [[5, 17, 42, 99, 7], list(range(3, 40)), [200, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
STARTUP_TIMEOUT_S = 120
EXIT_TIMEOUT_S = 30  # after a follower dies, the server must be gone within this


def _generate(model_dir: Path, tp: int) -> list:
    """Greedy with top-2 logprobs and prompt logprobs (their rows ride in the step broadcast),
    chunked prefill beside decodes; then seeded n=2 sampling (its forks copy KV blocks: the
    step broadcast carries the copies)."""
    with LLM(str(model_dir), tensor_parallel_size=tp, max_num_batched_tokens=16, **ENGINE) as llm:
        greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, logprobs=2, prompt_logprobs=2,
                                                      ignore_eos=True))
        sampled = llm.generate([PROMPTS[1]], SamplingParams(temperature=0.8, n=2, seed=7, max_tokens=20,
                                                             ignore_eos=True))
    return greedy + sampled


def _assert_same(ref, out) -> None:
    for a, b in zip(ref, out, strict=True):
        assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
        for pa, pb in zip(a.prompt_logprobs or [], b.prompt_logprobs or [], strict=True):
            assert (pa is None) == (pb is None)
            if pa is not None:
                assert pa.logprobs.keys() == pb.logprobs.keys()
                assert max(abs(pa.logprobs[t] - pb.logprobs[t]) for t in pa.logprobs) < LOGPROB_TOL
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            assert cb.token_ids == ca.token_ids
            if ca.logprobs is None:
                continue
            for la, lb in zip(ca.logprobs, cb.logprobs, strict=True):
                assert la.keys() == lb.keys()
                assert max(abs(la[t] - lb[t]) for t in la) < LOGPROB_TOL


def test_offline_tp2_matches_tp1(tiny_checkpoint):
    model = tiny_checkpoint("llama")
    ref, out = _generate(model, 1), _generate(model, 2)
    assert len({tuple(r.outputs[0].token_ids) for r in ref}) == len(ref)  # distinct prompts, distinct outputs
    assert [len(r.prompt_logprobs) for r in ref[:len(PROMPTS)]] == [len(p) for p in PROMPTS]
    _assert_same(ref, out)


def test_stopped_followers_exit_zero(tiny_checkpoint):
    """STOP ends a spawned follower cleanly: its heartbeat is stopped before rank 0's store
    goes away, so the follower neither reports a lost store nor aborts at exit."""
    llm = LLM(str(tiny_checkpoint("llama")), tensor_parallel_size=2, **ENGINE)
    with llm:
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3, ignore_eos=True))
        procs = list(llm.engine.tp.procs.values())
    assert procs and [p.exitcode for p in procs] == [0] * len(procs)


def test_tied_embeddings_and_qkv_bias_shard(tiny_checkpoint):
    """qwen2: the tied LM head reads the vocab shard of the embedding; q/k/v biases split by head."""
    model = tiny_checkpoint("qwen2")
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=1, ignore_eos=True)
    with LLM(str(model), **ENGINE) as one, LLM(str(model), tensor_parallel_size=2, **ENGINE) as two:
        _assert_same(one.generate(PROMPTS[:2], params), two.generate(PROMPTS[:2], params))


@pytest.mark.parametrize("arch, kwargs, message", [
    ("qwen3", {}, "must divide the model's KV heads (1)"),
    ("gpt2", {}, "supports the Llama family"),
    ("llama", {"tensor_parallel_size": 3}, "attention heads (4), KV heads (2), intermediate size (128)"),
    ("llama", {"quantization": "int4"}, "quantization int4 cannot be sharded"),
])
def test_unsupported_combinations_fail_before_starting_ranks(tiny_checkpoint, arch, kwargs, message):
    kwargs = {"tensor_parallel_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLM(str(tiny_checkpoint(arch)), **kwargs, **ENGINE)


# -- a real server ------------------------------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKMEM_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **extra)
    return env


def _serve(model_dir: Path, log_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server", "serve", "--model", str(model_dir), "--dtype", "float32",
           "--device", "cpu", "--port", str(port), "--served-model-name", "tiny", "--num-kv-blocks", "64",
           "--max-model-len", str(MAX_MODEL_LEN), "--tensor-parallel-size", "2"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} during start-up:\n{log_path.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()}")


def _followers(pid: int) -> list[int]:
    """The server's spawned rank processes (Linux /proc)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
            and b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_http_tp2_matches_offline_tp1(tiny_checkpoint, tmp_path):
    """The several-machines path on loopback: `serve` is rank 0 and `tp-worker` rank 1, meeting
    through torchrun-style variables (no spawned ranks)."""
    model = tiny_checkpoint("llama")
    with LLM(str(model), **ENGINE) as llm:
        ref = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, logprobs=1, ignore_eos=True))
    rendezvous = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "server", "tp-worker"], cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT, env=_env(RANK="1", **rendezvous))
    proc, url = _serve(model, tmp_path / "server.log", _env(RANK="0", **rendezvous))
    try:
        assert _followers(proc.pid) == []
        with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60) as oai:
            for prompt, r in zip(PROMPTS, ref):
                out = oai.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=1,
                                             extra_body={"ignore_eos": True})
                lps = out.choices[0].logprobs.token_logprobs
                expected = [lp[t] for lp, t in zip(r.outputs[0].logprobs, r.outputs[0].token_ids)]
                assert out.usage.completion_tokens == len(expected) == len(lps)
                assert max(abs(a - b) for a, b in zip(lps, expected)) < LOGPROB_TOL
                assert out.choices[0].text == r.outputs[0].text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(EXIT_TIMEOUT_S) == 0, (tmp_path / "server.log").read_text()
        try:
            assert worker.wait(EXIT_TIMEOUT_S) == 0, (tmp_path / "worker.log").read_text()  # told to stop
        finally:
            if worker.poll() is None:
                worker.kill()


def test_killed_follower_fails_health_and_exits_nonzero(tiny_checkpoint, tmp_path):
    proc, url = _serve(tiny_checkpoint("llama"), tmp_path / "server.log", _env())
    try:
        (follower,) = _followers(proc.pid)
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[len("data: "):])["choices"]  # a token event: generating across both ranks
            os.kill(follower, signal.SIGKILL)
            rest = list(lines)  # the stream ends (with an error event) instead of hanging
        assert "data: [DONE]" not in rest or any('"error"' in line for line in rest)
        statuses = []
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                statuses.append(httpx.get(url + "/health", timeout=2).status_code)
            except httpx.HTTPError:
                statuses.append(None)  # the port closed: the server is on its way out
            time.sleep(0.05)
        assert proc.wait(EXIT_TIMEOUT_S) == EXIT_RANK_LOST
        lost = next(i for i, status in enumerate(statuses) if status != 200)  # 503, or the port closed
        assert 200 not in statuses[lost:]
        assert "rank 1" in (tmp_path / "server.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


# -- failure paths: nothing left behind -----------------------------------------------------
def _tp_engine(model_dir: Path):
    from server.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=str(model_dir), tensor_parallel_size=2, **ENGINE))


@pytest.mark.parametrize("where", ["load", "plan", "after the build"])
def test_startup_failure_on_rank_0_stops_a_tp_worker(tiny_checkpoint, tmp_path, monkeypatch, where):
    """Rank 0 (in this process) fails at each step of its start-up after the group formed; the
    `workmem tp-worker` follower, wherever it is in its own start-up (loading, in the KV plan's
    all-reduce, waiting for its first step), sees why within a heartbeat and exits 1, well
    before the collectives' --tp-timeout (60 s) would end its wait (or, waiting for a first
    step, never)."""
    model = tiny_checkpoint("llama")
    rendezvous = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "server", "tp-worker"], cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT, env=_env(RANK="1", **rendezvous))
    for key, value in {**rendezvous, "RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    target = {"load": "server.engine.build.load_model", "plan": "server.engine.build.plan_shard",
              "after the build": "server.engine.engine.SessionTable"}[where]

    def fail(*_args, **_kwargs):
        raise RuntimeError(f"injected fault at {where}")

    monkeypatch.setattr(target, fail)
    try:
        with pytest.raises(RuntimeError, match="injected fault"):
            _tp_engine(model)
        assert worker.wait(EXIT_TIMEOUT_S) == 1, log_path.read_text()
        assert f"rank 0 failed to start: RuntimeError: injected fault at {where}" in log_path.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()


async def test_rank_loss_reaches_the_engine_thread_and_stops_it(tiny_checkpoint):
    """A follower killed while the engine idles: the monitor posts the loss to the engine
    thread's inbox; that thread stops (no engine state set from the monitor thread), and new
    requests get EngineDeadError."""
    import asyncio

    from model.parallel import RankLostError
    from server.async_engine import AsyncEngine, EngineDeadError

    engine = AsyncEngine(_tp_engine(tiny_checkpoint("llama")))
    engine.start()
    try:
        out = [o async for o in engine.generate("a", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))]
        assert sum(len(o.new_token_ids) for o in out) == 3
        (proc,) = engine.engine.tp.procs.values()
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(engine._thread.join, EXIT_TIMEOUT_S)
        assert not engine._thread.is_alive() and not engine.is_alive
        assert isinstance(engine.error, RankLostError) and "rank 1" in str(engine.error)
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("b", [5, 6, 7], SamplingParams(max_tokens=3)):
                pass
    finally:
        engine.shutdown()
        engine.close()


async def test_close_after_a_timed_out_join_sends_no_stop(tiny_checkpoint, monkeypatch):
    """shutdown()'s join times out while a step runs; close() then must not broadcast STOP
    beside that step's collectives: the follower is killed, and the step, once it goes on,
    fails with RankLostError instead of deadlocking or mismatching the collectives."""
    import asyncio
    import threading

    from model.parallel import RankLostError
    from server.async_engine import AsyncEngine

    engine = AsyncEngine(_tp_engine(tiny_checkpoint("llama")))
    entered, release = threading.Event(), threading.Event()
    real_step = engine.engine.step

    def slow_step():
        entered.set()
        release.wait(EXIT_TIMEOUT_S)
        return real_step()

    engine.engine.step = slow_step
    stops = []
    monkeypatch.setattr("server.engine.parallel.launch.send_stop", lambda *args: stops.append(args))
    engine.start()
    stream = engine.generate("a", [5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    first = asyncio.ensure_future(anext(stream))
    try:
        assert await asyncio.to_thread(entered.wait, EXIT_TIMEOUT_S)
        engine.shutdown(timeout=0.1)
        assert engine._thread.is_alive()  # the step outlived the join
        engine.close()
        assert stops == []
        assert not any(p.is_alive() for p in engine.engine.tp.procs.values())
        release.set()
        await asyncio.to_thread(engine._thread.join, EXIT_TIMEOUT_S)
        assert not engine._thread.is_alive() and isinstance(engine.error, RankLostError)
    finally:
        release.set()
        first.cancel()
        engine.close()
