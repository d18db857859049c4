"""Soak: every kind of request for as long as you ask, under memory pressure, clients
vanishing mid-stream, and (optionally) a replica restart in the middle.

    python -m loadtest.soak --url http://127.0.0.1:8000 --minutes 30 --concurrency 16
    python -m loadtest.soak ... --restart-command 'kill -9 $(cat /run/wm.pid); start-wm.sh'

Workers draw actions (loadtest/soak_actions.py: completions, chats, session flows with
forks, structured output, tool calls, Responses, Messages, malformed requests) until
`--minutes` (or `--requests`) are used up. Halfway, `--restart-command` (or a test's
`restart` callback) may restart the server, with `--session-dir`, for instance by kill -9;
the soak waits for /health 200 again. Afterwards it checks, against /metrics and the API:

- no 5xx and no transport error on a valid request (a request that overlapped the restart
  is counted apart); every malformed request got a 4xx;
- every kept request finished whole; preemptions happened (the pool must be too small);
- once idle, `workmem_kv_blocks_used` equals `workmem_session_blocks_pinned`;
- every kept session that completed a turn still exists with at least those turns;
- resident memory grew by at most `--max-rss-growth-mib` from the warm baseline (taken when
  `--warmup` of the run, counted from the restart if there was one, had passed) to the end;
  open fds and OS threads by at most FD_SLACK / THREAD_SLACK.

Speaks HTTP only. Exits 1 when a check fails. `run_soak` is what tests call.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from typing import Awaitable, Callable

import httpx

from loadtest.soak_actions import DEFAULT_PROMPT_WORDS, Soak, SoakReport

DEFAULT_MAX_RSS_GROWTH_MIB = 64.0  # after warm-up; a leak of a few KiB per request passes this within minutes
DEFAULT_WARMUP = 0.2  # share of the run (after a restart: of what is left) before the baseline
FD_SLACK = 8  # open fds the end may have beyond the warm baseline (the soak's own connections close first)
THREAD_SLACK = 4  # OS threads likewise (worker pools grow to their size during warm-up)
SETTLE_TIMEOUT_S = 30.0
HEALTH_TIMEOUT_S = 180.0  # a restarted server must be healthy again within this

__all__ = ["SoakReport", "failures", "run_soak"]


def failures(report: SoakReport, max_rss_growth_mib: float = DEFAULT_MAX_RSS_GROWTH_MIB) -> list[str]:
    out = [f"5xx/transport: {e}" for e in report.server_errors[:5]] + [f"short: {e}" for e in report.incomplete[:5]]
    if report.preemptions <= 0:
        out.append("no preemptions: the KV pool was not under pressure")
    if report.kv_used_end != report.kv_pinned_end:
        out.append(f"blocks leaked: {report.kv_used_end:.0f} used, live sessions pin {report.kv_pinned_end:.0f}")
    out += [f"session lost: {s}" for s in report.lost_sessions]
    growth = report.rss_mib.get("end", 0.0) - report.rss_mib.get("warm", 0.0)
    if growth > max_rss_growth_mib:
        out.append(f"RSS grew {growth:.1f} MiB after warm-up (bound {max_rss_growth_mib:g})")
    for name, series, slack in (("open fds", report.fds, FD_SLACK), ("threads", report.threads, THREAD_SLACK)):
        if series.get("end", 0.0) > series.get("warm", 0.0) + slack:
            out.append(f"{name} leaked: {series.get('warm')} after warm-up, {series.get('end')} at the end")
    return out


async def _metrics(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()[:2]
            out[name] = float(value)
    return out


def _sample(report: SoakReport, point: str, m: dict[str, float]) -> None:
    report.rss_mib[point] = m.get("process_resident_memory_bytes", 0.0) / 2**20
    report.fds[point] = m.get("process_open_fds", 0.0)
    report.threads[point] = m.get("workmem_process_threads", 0.0)


async def run_soak(url: str, requests: int | None = 400, concurrency: int = 16, vanish: float = 1 / 3,
                   seed: int = 0, max_seconds: float = 600.0, api_key: str | None = None,
                   words: tuple[int, int] = DEFAULT_PROMPT_WORDS, warmup: float = DEFAULT_WARMUP,
                   restart: Callable[[], Awaitable[None]] | None = None) -> SoakReport:
    """Run until `requests` have started (None: no limit) or `max_seconds` passed."""
    report = SoakReport()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        soak = Soak(client, random.Random(seed), report, vanish, words, model)
        start = time.monotonic()
        _sample(report, "start", await _metrics(client))
        progress = (lambda: report.started / requests) if requests else (lambda: (time.monotonic() - start) / max_seconds)
        done = lambda: (requests is not None and report.started >= requests) or time.monotonic() - start >= max_seconds
        phase = {"from": 0.0, "warm": False, "restarted": restart is None}
        serving = asyncio.Event()  # cleared while the restart runs: the other workers wait
        serving.set()

        async def between_actions() -> None:
            if not phase["restarted"] and progress() >= 0.5:
                phase["restarted"] = True
                soak.epoch += 1
                soak.restarting = True
                serving.clear()
                try:
                    await restart()
                    await _healthy(client)
                finally:
                    soak.restarting = False
                    serving.set()
                report.restarts += 1
                phase.update({"from": progress(), "warm": False})
            if not phase["warm"] and progress() >= phase["from"] + warmup * (1 - phase["from"]):
                phase["warm"] = True
                _sample(report, "warm", await _metrics(client))

        async def worker() -> None:
            while not done():
                await serving.wait()
                await soak.any()
                await between_actions()

        await asyncio.gather(*[worker() for _ in range(concurrency)])
        report.seconds = time.monotonic() - start
        await _check_sessions(client, soak)
        for s in soak.kept:
            await client.delete(f"/v1/sessions/{s}")
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=headers) as fresh:  # the soak's connections closed
        final = await _settle(fresh)
        report.preemptions = final.get("workmem_num_preemptions_total", 0.0)
        report.kv_used_end = final.get("workmem_kv_blocks_used", -1.0)
        report.kv_pinned_end = final.get("workmem_session_blocks_pinned", -2.0)
        _sample(report, "end", final)
    return report


async def _check_sessions(client: httpx.AsyncClient, soak: Soak) -> None:
    for sid, turns in soak.kept.items():
        r = await client.get(f"/v1/sessions/{sid}")
        if r.status_code != 200 or r.json()["num_turns"] < turns:
            soak.report.lost_sessions.append(f"{sid}: {turns} turns completed, now HTTP {r.status_code} {r.text[:120]}")


async def _healthy(client: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the server was not healthy within {HEALTH_TIMEOUT_S:.0f} s of the restart")


async def _settle(client: httpx.AsyncClient) -> dict[str, float]:
    """Metrics once nothing runs or waits (aborts of vanished clients land within a step)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        m = await _metrics(client)
        idle = not m.get("workmem_num_requests_running") and not m.get("workmem_num_requests_waiting")
        if idle or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--minutes", type=float, default=None, help="run this long (then --requests is no limit)")
    p.add_argument("--requests", type=int, default=400, help="requests to start (each session turn counts)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--vanish", type=float, default=1 / 3, help="share of streamed requests that hang up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=600.0, help="without --minutes: stop after this long")
    p.add_argument("--prompt-words", type=int, nargs=2, default=DEFAULT_PROMPT_WORDS, metavar=("MIN", "MAX"))
    p.add_argument("--warmup", type=float, default=DEFAULT_WARMUP, help="share of the run before the RSS baseline")
    p.add_argument("--max-rss-growth-mib", type=float, default=DEFAULT_MAX_RSS_GROWTH_MIB)
    p.add_argument("--restart-command", default=None,
                   help="shell command run halfway that restarts the server (e.g. kill -9 and start it again)")
    args = p.parse_args(argv)

    async def restart() -> None:
        await asyncio.to_thread(subprocess.run, args.restart_command, shell=True, check=True)

    report = asyncio.run(run_soak(
        args.url, None if args.minutes else args.requests, args.concurrency, args.vanish, args.seed,
        args.minutes * 60 if args.minutes else args.max_seconds, args.api_key, tuple(args.prompt_words),
        args.warmup, restart if args.restart_command else None))
    failed = failures(report, args.max_rss_growth_mib)
    summary = {k: v for k, v in vars(report).items() if k not in ("server_errors", "incomplete")}
    print(json.dumps({**summary, "server_errors": report.server_errors[:5], "incomplete": report.incomplete[:5],
                      "failures": failed}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
