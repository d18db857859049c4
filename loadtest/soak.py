"""Soak: mixed traffic under memory pressure, with clients vanishing mid-stream.

    python -m loadtest.soak --url http://127.0.0.1:8000 --requests 400 --concurrency 16

Each worker draws actions until `--requests` have started or `--max-seconds` passed:
completions and chats (streamed or not, random sampling parameters, n up to 4, stop
strings on some), and session flows (create, two turns, fork, a turn on the fork, delete
both; a few sessions are kept alive to the end). A `--vanish` share of streamed requests
read a few chunks and hang up. Afterwards it checks, against the server's /metrics:

- no 5xx, and no transport error on a kept request;
- every kept request finished whole: `n x max_tokens` tokens (`ignore_eos`), or fewer
  only when it had stop strings and said `stop`;
- preemptions happened (the KV pool must be much smaller than the demand);
- once idle, `workmem_kv_blocks_used` equals `workmem_session_blocks_pinned` (what the
  live sessions pin): nothing leaked;
- resident memory (`process_resident_memory_bytes`) at start, middle and end.

Speaks HTTP only. Exits 1 when a check fails. `run_soak` is what tests call.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field

import httpx

WORDS = "memory block page token cache session stream model answer river stone cloud".split()
STOPS = ["river stone", "zzq", "cloud."]  # rarely or never generated: most stop requests run whole
DEFAULT_MAX_TOKENS = (4, 24)  # per request, drawn uniformly
DEFAULT_PROMPT_WORDS = (3, 40)  # words per user message / prompt
KEPT_SESSIONS = 2  # sessions left alive at the end, so "used == pinned" is not trivially 0 == 0
SETTLE_TIMEOUT_S = 30.0
CLIENT_ERROR_SAMPLES = 5


@dataclass
class SoakReport:
    started: int = 0
    kept_ok: int = 0
    vanished: int = 0
    server_errors: list[str] = field(default_factory=list)  # 5xx and transport errors on kept requests
    incomplete: list[str] = field(default_factory=list)  # kept requests that came back short
    client_errors: dict[int, int] = field(default_factory=dict)  # 4xx status -> count (e.g. 409 busy, 429)
    client_error_samples: list[str] = field(default_factory=list)
    sessions_created: int = 0
    preemptions: float = 0.0
    kv_used_end: float = -1.0
    kv_pinned_end: float = -1.0
    rss_mib: list[float] = field(default_factory=list)  # start, middle, end
    seconds: float = 0.0

    @property
    def failures(self) -> list[str]:
        out = [f"5xx/transport: {e}" for e in self.server_errors[:5]] + [f"short: {e}" for e in self.incomplete[:5]]
        if self.preemptions <= 0:
            out.append("no preemptions: the KV pool was not under pressure")
        if self.kv_used_end != self.kv_pinned_end:
            out.append(f"blocks leaked: {self.kv_used_end:.0f} used, live sessions pin {self.kv_pinned_end:.0f}")
        return out


def _prompt(rng: random.Random, words: tuple[int, int]) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))


def _sampling(rng: random.Random, streamed: bool) -> dict:
    body = {"max_tokens": rng.randint(*DEFAULT_MAX_TOKENS), "ignore_eos": True, "stream": streamed,
            "temperature": rng.choice([0.0, 0.7, 1.0]), "top_p": rng.choice([1.0, 0.9]),
            "top_k": rng.choice([-1, 20]), "seed": rng.randrange(1 << 30)}
    if streamed:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.3:
        body["stop"] = rng.sample(STOPS, 2)
    return body


async def _metrics(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()[:2]
            out[name] = float(value)
    return out


class Soak:
    def __init__(self, client: httpx.AsyncClient, rng: random.Random, report: SoakReport, vanish: float,
                 words: tuple[int, int]) -> None:
        self.client, self.rng, self.report, self.vanish, self.words = client, rng, report, vanish, words
        self.kept_sessions: list[str] = []

    async def generate(self, path: str, body: dict, vanish: bool) -> dict | None:
        """One request; returns its usage + finish reasons, None when it vanished or failed."""
        self.report.started += 1
        try:
            if not body.get("stream"):
                r = await self.client.post(path, json=body)
                return self._answer(path, r.status_code, r.text, r.json() if r.status_code == 200 else None)
            async with self.client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    return self._answer(path, r.status_code, (await r.aread()).decode(), None)
                return await self._read_stream(path, r, vanish)
        except httpx.HTTPError as exc:
            self.report.server_errors.append(f"{path}: {type(exc).__name__}: {exc}")
            return None

    async def _read_stream(self, path: str, r: httpx.Response, vanish: bool) -> dict | None:
        usage, reasons, seen = None, [], 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                self.report.server_errors.append(f"{path}: stream error {chunk['error']}")
                return None
            seen += 1
            if vanish and seen >= 2:
                self.report.vanished += 1
                return None  # leaving the block closes the connection mid-stream
            usage = chunk.get("usage") or usage
            reasons += [c["finish_reason"] for c in chunk.get("choices", []) if c.get("finish_reason")]
        return {"usage": usage, "reasons": reasons}

    def _answer(self, path: str, status: int, text: str, body: dict | None) -> dict | None:
        if status >= 500:
            self.report.server_errors.append(f"{path}: HTTP {status} {text[:200]}")
        elif status >= 400:
            self.report.client_errors[status] = self.report.client_errors.get(status, 0) + 1
            if len(self.report.client_error_samples) < CLIENT_ERROR_SAMPLES:
                self.report.client_error_samples.append(f"{path}: HTTP {status} {text[:200]}")
        if body is None:
            return None
        return {"usage": body["usage"], "reasons": [c["finish_reason"] for c in body["choices"]]}

    def check_whole(self, what: str, body: dict, result: dict | None) -> None:
        if result is None:
            return
        want = body["max_tokens"] * body.get("n", 1)
        got = result["usage"]["completion_tokens"] if result["usage"] else -1
        stopped_early = body.get("stop") and "stop" in result["reasons"]
        if got == want or (stopped_early and got < want):
            self.report.kept_ok += 1
        else:
            self.report.incomplete.append(f"{what}: {got} of {want} tokens, finish {result['reasons']}")

    async def one_request(self) -> None:
        rng = self.rng
        streamed = rng.random() < 0.6
        vanish = streamed and rng.random() < self.vanish
        body = _sampling(rng, streamed)
        body["n"] = rng.choice([1, 1, 2, 4])
        if rng.random() < 0.5:
            path, body["prompt"] = "/v1/completions", _prompt(rng, self.words)
        else:
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": _prompt(rng, self.words)}]
        result = await self.generate(path, body, vanish)
        if not vanish:
            self.check_whole(path, body, result)

    async def session_flow(self) -> None:
        rng = self.rng
        r = await self.client.post("/v1/sessions", json={"messages": [{"role": "system", "content": "Be brief."}]})
        if r.status_code != 200:
            self._answer("/v1/sessions", r.status_code, r.text, None)
            return
        self.report.sessions_created += 1
        sid = r.json()["id"]
        ids = [sid]
        for turn in range(3):
            target = ids[-1]
            body = {**_sampling(rng, rng.random() < 0.5), "messages": [{"role": "user", "content": _prompt(rng, self.words)}]}
            body.pop("stop", None)
            vanish = body["stream"] and rng.random() < self.vanish
            result = await self.generate(f"/v1/sessions/{target}/chat/completions", body, vanish)
            if not vanish:
                self.check_whole("session turn", body, result)
            if turn == 1:
                fork = await self.client.post(f"/v1/sessions/{sid}/fork")
                if fork.status_code == 200:
                    ids.append(fork.json()["id"])
                else:
                    self._answer("fork", fork.status_code, fork.text, None)
        if len(self.kept_sessions) < KEPT_SESSIONS:
            self.kept_sessions.append(ids.pop())
        for s in ids:
            r = await self.client.delete(f"/v1/sessions/{s}")
            if r.status_code not in (200, 404):
                self._answer("delete", r.status_code, r.text, None)


async def run_soak(url: str, requests: int = 400, concurrency: int = 16, vanish: float = 1 / 3,
                   seed: int = 0, max_seconds: float = 600.0, api_key: str | None = None,
                   words: tuple[int, int] = DEFAULT_PROMPT_WORDS) -> SoakReport:
    report = SoakReport()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        soak = Soak(client, random.Random(seed), report, vanish, words)
        start = time.monotonic()
        report.rss_mib.append((await _metrics(client)).get("process_resident_memory_bytes", 0) / 2**20)

        middle_taken: list[bool] = []

        async def worker() -> None:
            while report.started < requests and time.monotonic() - start < max_seconds:
                if soak.rng.random() < 0.2:
                    await soak.session_flow()
                else:
                    await soak.one_request()
                if report.started >= requests // 2 and not middle_taken:
                    middle_taken.append(True)
                    report.rss_mib.append((await _metrics(client)).get("process_resident_memory_bytes", 0) / 2**20)

        await asyncio.gather(*[worker() for _ in range(concurrency)])
        report.seconds = time.monotonic() - start
        final = await _settle(client)
        report.preemptions = final.get("workmem_num_preemptions_total", 0.0)
        report.kv_used_end = final.get("workmem_kv_blocks_used", -1.0)
        report.kv_pinned_end = final.get("workmem_session_blocks_pinned", -2.0)
        report.rss_mib.append(final.get("process_resident_memory_bytes", 0) / 2**20)
        for s in soak.kept_sessions:
            await client.delete(f"/v1/sessions/{s}")
    return report


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
    p.add_argument("--requests", type=int, default=400, help="requests to start (sessions count each turn)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--vanish", type=float, default=1 / 3, help="share of streamed requests that hang up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--prompt-words", type=int, nargs=2, default=DEFAULT_PROMPT_WORDS, metavar=("MIN", "MAX"))
    args = p.parse_args(argv)
    report = asyncio.run(run_soak(args.url, args.requests, args.concurrency, args.vanish, args.seed,
                                  args.max_seconds, args.api_key, tuple(args.prompt_words)))
    summary = {k: v for k, v in vars(report).items() if k not in ("server_errors", "incomplete")}
    print(json.dumps({**summary, "server_errors": report.server_errors[:5], "incomplete": report.incomplete[:5],
                      "failures": report.failures}, indent=2))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
