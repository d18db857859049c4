"""One benchmark run against one server: resolve the model, probe the session API, warm
up, then issue the workload's jobs (closed loop with `concurrency`, open loop with
`request_rate`, or both) while scraping `/metrics`; returns the result JSON (a dict)."""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import httpx

from loadtest.client import ERROR_BODY_CHARS, LiveStats, RequestResult, stream_request
from loadtest.config import BenchConfig
from loadtest.progress import live_progress
from loadtest.report import summarize
from loadtest.scrape import Scraper
from loadtest.workloads import Job, Turn, arrival_gaps, jobs, warmup_jobs

SESSIONS_PATH = "/v1/sessions"
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
SESSION_MODE_API = "sessions-api"  # each turn sends only its new message to /v1/sessions/{id}
SESSION_MODE_HISTORY = "history"  # each turn resends the whole history to /v1/chat/completions


@dataclass
class Context:
    """What every job of a run shares."""

    client: httpx.AsyncClient
    cfg: BenchConfig
    model: str | None
    session_mode: str | None
    live: LiveStats | None = None


def make_client(cfg: BenchConfig) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    return httpx.AsyncClient(base_url=cfg.url, headers=headers, timeout=cfg.timeout_s,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


async def resolve_model(client: httpx.AsyncClient, model: str | None) -> tuple[str | None, str | None]:
    """(model id, error): the given one, else the first id of GET /v1/models."""
    if model:
        return model, None
    try:
        r = await client.get("/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"], None
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        return None, f"GET /v1/models failed ({type(exc).__name__}: {exc}); sending no model"


async def probe_sessions(client: httpx.AsyncClient) -> bool:
    """True when the server has workmem's session API (GET /v1/sessions lists them)."""
    try:
        r = await client.get(SESSIONS_PATH)
        return r.status_code == 200 and r.json().get("object") == "list"
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


def request_body(ctx: Context, turn: Turn, messages: list[dict] | None = None) -> dict:
    """The generation request of one turn: greedy, `max_tokens`, `ignore_eos` if asked."""
    body: dict = {"max_tokens": turn.max_tokens, "temperature": 0.0}
    if ctx.model:
        body["model"] = ctx.model
    if ctx.cfg.ignore_eos:
        body["ignore_eos"] = True
    if messages is not None:
        body["messages"] = messages
    elif ctx.cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": turn.prompt}]
    else:
        body["prompt"] = turn.prompt
    return body


async def run_single(ctx: Context, turn: Turn) -> list[RequestResult]:
    path = CHAT_PATH if ctx.cfg.endpoint == "chat" else COMPLETIONS_PATH
    return [await stream_request(ctx.client, path, request_body(ctx, turn), live=ctx.live)]


async def open_session(ctx: Context) -> tuple[str | None, str | None]:
    """(session id, error) of a new server-side session."""
    try:
        r = await ctx.client.post(SESSIONS_PATH, json={"model": ctx.model} if ctx.model else {})
        if r.status_code == 200:
            return r.json()["id"], None
        return None, f"POST {SESSIONS_PATH}: HTTP {r.status_code}: {r.text[:ERROR_BODY_CHARS]}"
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return None, f"POST {SESSIONS_PATH}: {type(exc).__name__}: {exc}"


async def run_conversation(ctx: Context, job: Job) -> list[RequestResult]:
    """The turns one after another; through the session API, else resending the history."""
    sid = None
    if ctx.session_mode == SESSION_MODE_API:
        sid, error = await open_session(ctx)
        if sid is None:
            failed = [RequestResult(start=time.perf_counter(), turn=i + 1).fail(error or "no session")
                      for i in range(len(job.turns))]
            return [ctx.live.record(r) for r in failed] if ctx.live else failed
    history: list[dict] = []
    results = []
    for i, turn in enumerate(job.turns):
        user = {"role": "user", "content": turn.prompt}
        path = f"{SESSIONS_PATH}/{sid}/chat/completions" if sid else CHAT_PATH
        body = request_body(ctx, turn, messages=[user] if sid else [*history, user])
        r = await stream_request(ctx.client, path, body, turn=i + 1, live=ctx.live)
        history += [user, {"role": "assistant", "content": r.text}]
        results.append(r)
    if sid and not ctx.cfg.keep_sessions:
        try:
            await ctx.client.delete(f"{SESSIONS_PATH}/{sid}")
        except httpx.HTTPError:
            pass
    return results


async def run_job(ctx: Context, job: Job) -> list[RequestResult]:
    """A job's results; an unexpected exception fails its requests instead of the run."""
    try:
        return await (run_conversation(ctx, job) if job.conversation else run_single(ctx, job.turns[0]))
    except Exception as exc:  # noqa: BLE001 - reported in the result, never a traceback
        failed = RequestResult(start=time.perf_counter()).fail(f"{type(exc).__name__}: {exc}")
        return [ctx.live.record(failed) if ctx.live else failed]


async def drive(ctx: Context, todo: Iterable[Job], seed: int) -> list[RequestResult]:
    """Issue jobs on the arrival schedule, at most `concurrency` in flight, until the jobs
    run out or `duration_s` passes; then wait for those in flight."""
    cfg = ctx.cfg
    slots = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
    start = next_at = time.perf_counter()
    gaps = arrival_gaps(cfg.request_rate, cfg.burstiness, seed)
    tasks: list[asyncio.Task] = []

    async def one(job: Job) -> list[RequestResult]:
        try:
            return await run_job(ctx, job)
        finally:
            if slots:
                slots.release()

    for job in todo:
        next_at += next(gaps)
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        if slots:
            await slots.acquire()
        if cfg.duration_s is not None and time.perf_counter() - start >= cfg.duration_s:
            if slots:
                slots.release()
            break
        tasks.append(asyncio.create_task(one(job)))
    return [r for rs in await asyncio.gather(*tasks) for r in rs]


def session_note(mode: str | None, cfg: BenchConfig) -> str | None:
    """Says how the sessions workload sent its turns (None for other workloads)."""
    if mode == SESSION_MODE_API:
        return "sessions: each turn sent only its new message to /v1/sessions/{id}/chat/completions"
    if mode == SESSION_MODE_HISTORY:
        why = "no /v1/sessions on this server" if cfg.use_session_api else "--no-session-api"
        return f"sessions: {why}; each turn resent the whole history to /v1/chat/completions"
    return None


def expected_requests(cfg: BenchConfig) -> int | None:
    if cfg.workload == "sessions":
        return cfg.num_sessions * cfg.turns
    return cfg.num_requests


async def run_benchmark(cfg: BenchConfig, name: str | None = None) -> dict:
    """One run against `cfg.url`; the result JSON (see README "Benchmarking")."""
    async with make_client(cfg) as client:
        model, model_error = await resolve_model(client, cfg.model)
        mode = None
        if cfg.workload == "sessions":
            api = cfg.use_session_api and await probe_sessions(client)
            mode = SESSION_MODE_API if api else SESSION_MODE_HISTORY
        ctx = Context(client, cfg, model, mode)
        if cfg.warmup:
            warm = replace(cfg, concurrency=min(cfg.warmup, cfg.concurrency or cfg.warmup),
                           request_rate=math.inf, duration_s=None)
            await drive(replace(ctx, cfg=warm), warmup_jobs(cfg, cfg.seed), cfg.seed)
        scraper = Scraper(client, cfg.scrape_interval_s)
        await scraper.start()
        ctx.live = LiveStats(total=expected_requests(cfg))
        async with live_progress(ctx.live, name or cfg.url, enabled=cfg.progress):
            run_start = time.perf_counter()
            results = await drive(ctx, jobs(cfg, cfg.seed), cfg.seed)
            duration = time.perf_counter() - run_start
        await scraper.stop()
    notes = [n for n in (model_error, session_note(mode, cfg)) if n]
    return {"name": name or cfg.url, "url": cfg.url, "model": model, "endpoint": cfg.endpoint,
            "workload": cfg.workload, "session_mode": mode,
            **summarize(results, duration, run_start, cfg.slo),
            "server_metrics": scraper.result(), "notes": notes, "parameters": cfg.parameters()}
