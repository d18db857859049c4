"""What the soak's workers do (loadtest/soak.py drives them and checks the outcome).

Each action is one client's errand over HTTP: a completion or chat (streamed or not, n up
to 4, random sampling, stop strings), a session flow (create, turns, fork, a turn on the
fork, delete), structured output (a JSON schema), a tool call (tool_choice required), a
Responses turn chained with previous_response_id, an Anthropic Messages call, and a
malformed request (it must get a 4xx). A share of streams hang up after two chunks.
Requests that overlap a replica restart are counted apart: their failures are expected.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import httpx

WORDS = "memory block page token cache session stream model answer river stone cloud".split()
STOPS = ["river stone", "zzq", "cloud."]  # rarely or never generated: most stop requests run whole
DEFAULT_MAX_TOKENS = (4, 24)  # per request, drawn uniformly
DEFAULT_PROMPT_WORDS = (3, 40)  # words per user message / prompt
KEPT_SESSIONS = 2  # sessions left alive to the end: "used == pinned" is not trivially 0 == 0, and a restart must keep them
CLIENT_ERROR_SAMPLES = 5
SCHEMA = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 8}}, "required": ["word"],
          "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "lookup", "description": "Look a word up",
                                         "parameters": {"type": "object", "properties": {"q": {"type": "string"}},
                                                        "required": ["q"]}}}
MALFORMED = [  # (path, body): each must be a 4xx
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}),
    ("/v1/sessions/sess_nope/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 7}}}),
    ("/v1/responses", {"input": "x", "previous_response_id": "resp_nope"}),
    ("/v1/messages", {"max_tokens": 8}),
]


@dataclass
class SoakReport:
    started: int = 0
    kept_ok: int = 0
    vanished: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)  # action -> times started
    server_errors: list[str] = field(default_factory=list)  # 5xx and transport errors on valid requests
    incomplete: list[str] = field(default_factory=list)  # kept requests that came back short or wrong
    client_errors: dict[int, int] = field(default_factory=dict)  # 4xx on valid requests (409 busy, 429)
    client_error_samples: list[str] = field(default_factory=list)
    malformed_ok: int = 0  # malformed requests answered 4xx, as they must
    during_restart: int = 0  # failures of requests that overlapped the restart (expected)
    sessions_created: int = 0
    restarts: int = 0
    preemptions: float = 0.0
    kv_used_end: float = -1.0
    kv_pinned_end: float = -1.0
    lost_sessions: list[str] = field(default_factory=list)  # kept sessions with a completed turn, gone or behind
    rss_mib: dict[str, float] = field(default_factory=dict)  # "start", "warm" (the baseline), "end"
    fds: dict[str, float] = field(default_factory=dict)
    threads: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class Soak:
    """The actions, sharing one client and report. `epoch` counts restarts begun and
    `restarting` is true while one runs: a request is 'valid' when neither moved under it."""

    def __init__(self, client: httpx.AsyncClient, rng: random.Random, report: SoakReport, vanish: float,
                 words: tuple[int, int], model: str) -> None:
        self.client, self.rng, self.report, self.vanish, self.words = client, rng, report, vanish, words
        self.model = model
        self.kept: dict[str, int] = {}  # kept session -> turns it completed
        self.epoch, self.restarting = 0, False
        self.last_response: str | None = None

    # -- plumbing -------------------------------------------------------------------------
    def _overlapped(self, epoch: int) -> bool:
        return self.restarting or epoch != self.epoch

    async def send(self, path: str, body: dict | bytes, vanish: bool = False, kind: str = "") -> tuple[int, dict | None]:
        """One request: (status, parsed JSON or the stream's summary); status 0 on a transport
        error, -1 when it vanished on purpose. Failures are recorded here."""
        self.report.started += 1
        self.report.by_kind[kind or path] = self.report.by_kind.get(kind or path, 0) + 1
        epoch = self.epoch
        try:
            if isinstance(body, bytes):
                r = await self.client.post(path, content=body, headers={"content-type": "application/json"})
                return self._status(path, r.status_code, r.text, epoch), None
            if not body.get("stream"):
                r = await self.client.post(path, json=body)
                status = self._status(path, r.status_code, r.text, epoch)
                return status, r.json() if status == 200 else None
            async with self.client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    return self._status(path, r.status_code, (await r.aread()).decode(), epoch), None
                return await self._read_stream(path, r, vanish, epoch)
        except httpx.HTTPError as exc:
            self._server_error(f"{path}: {type(exc).__name__}: {exc}", epoch)
            return 0, None

    def _server_error(self, text: str, epoch: int) -> None:
        if self._overlapped(epoch):
            self.report.during_restart += 1
        else:
            self.report.server_errors.append(text)

    def _status(self, path: str, status: int, text: str, epoch: int) -> int:
        if status >= 500:
            self._server_error(f"{path}: HTTP {status} {text[:200]}", epoch)
        elif status >= 400:
            self.report.client_errors[status] = self.report.client_errors.get(status, 0) + 1
            if len(self.report.client_error_samples) < CLIENT_ERROR_SAMPLES:
                self.report.client_error_samples.append(f"{path}: HTTP {status} {text[:200]}")
        return status

    async def _read_stream(self, path: str, r: httpx.Response, vanish: bool, epoch: int) -> tuple[int, dict | None]:
        usage, reasons, seen = None, [], 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                self._server_error(f"{path}: stream error {chunk['error']}", epoch)
                return 0, None
            seen += 1
            if vanish and seen >= 2:
                self.report.vanished += 1
                return -1, None  # leaving the block closes the connection mid-stream
            usage = chunk.get("usage") or usage
            reasons += [c["finish_reason"] for c in chunk.get("choices", []) if c.get("finish_reason")]
        return 200, {"usage": usage, "choices": [{"finish_reason": f} for f in reasons]}

    def check_whole(self, what: str, body: dict, result: dict | None) -> None:
        """A kept request gave n x max_tokens tokens (ignore_eos), or fewer only at a stop."""
        if result is None:
            return
        want = body["max_tokens"] * body.get("n", 1)
        got = result["usage"]["completion_tokens"] if result.get("usage") else -1
        reasons = [c["finish_reason"] for c in result["choices"]]
        if got == want or (body.get("stop") and "stop" in reasons and got < want):
            self.report.kept_ok += 1
        else:
            self.report.incomplete.append(f"{what}: {got} of {want} tokens, finish {reasons}")

    def sampling(self, streamed: bool) -> dict:
        rng = self.rng
        body = {"max_tokens": rng.randint(*DEFAULT_MAX_TOKENS), "ignore_eos": True, "stream": streamed,
                "temperature": rng.choice([0.0, 0.7, 1.0]), "top_p": rng.choice([1.0, 0.9]),
                "top_k": rng.choice([-1, 20]), "seed": rng.randrange(1 << 30)}
        if streamed:
            body["stream_options"] = {"include_usage": True}
        if rng.random() < 0.3:
            body["stop"] = rng.sample(STOPS, 2)
        return body

    def prompt(self) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(*self.words)))

    # -- actions --------------------------------------------------------------------------
    async def generation(self) -> None:
        streamed = self.rng.random() < 0.6
        vanish = streamed and self.rng.random() < self.vanish
        body = {**self.sampling(streamed), "n": self.rng.choice([1, 1, 2, 4])}
        if self.rng.random() < 0.5:
            path, body["prompt"] = "/v1/completions", self.prompt()
        else:
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": self.prompt()}]
        status, result = await self.send(path, body, vanish)
        if status == 200:
            self.check_whole(path, body, result)

    async def session_flow(self) -> None:
        status, created = await self.send("/v1/sessions", {"messages": [{"role": "system", "content": "Be brief."}]},
                                          kind="session create")
        if status != 200:
            return
        self.report.sessions_created += 1
        sid = created["id"]
        ids, turns = [sid], 0
        for turn in range(3):
            body = {**self.sampling(self.rng.random() < 0.5), "messages": [{"role": "user", "content": self.prompt()}]}
            body.pop("stop", None)
            vanish = body["stream"] and self.rng.random() < self.vanish
            status, result = await self.send(f"/v1/sessions/{ids[-1]}/chat/completions", body, vanish,
                                             kind="session turn")
            if status == 200:
                self.check_whole("session turn", body, result)
                turns += ids[-1] == sid
            if turn == 1:
                status, fork = await self.send(f"/v1/sessions/{sid}/fork", {}, kind="session fork")
                if status == 200:
                    ids.append(fork["id"])
        if len(self.kept) < KEPT_SESSIONS and turns:
            self.kept[ids.pop(0)] = turns  # the original: its completed turns must survive the restart
        for s in ids:
            epoch = self.epoch
            try:
                r = await self.client.delete(f"/v1/sessions/{s}")
            except httpx.HTTPError as exc:
                self._server_error(f"delete: {type(exc).__name__}: {exc}", epoch)
                continue
            if r.status_code not in (200, 404):
                self._status("delete", r.status_code, r.text, epoch)

    async def structured(self) -> None:
        body = {"messages": [{"role": "user", "content": self.prompt()}], "max_tokens": 40, "temperature": 0.7,
                "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}}
        status, result = await self.send("/v1/chat/completions", body, kind="structured")
        if status == 200 and result["choices"][0]["finish_reason"] == "stop":
            try:
                json.loads(result["choices"][0]["message"]["content"])
                self.report.kept_ok += 1
            except ValueError:
                self.report.incomplete.append(f"structured: not JSON: {result['choices'][0]['message']['content']!r}")

    async def tool_call(self) -> None:
        body = {"messages": [{"role": "user", "content": self.prompt()}], "max_tokens": 60, "tools": [TOOL],
                "tool_choice": "required"}
        status, result = await self.send("/v1/chat/completions", body, kind="tool call")
        if status == 200 and result["choices"][0]["finish_reason"] == "tool_calls":
            self.report.kept_ok += 1

    async def responses(self) -> None:
        body = {"model": self.model, "input": self.prompt(), "max_output_tokens": self.rng.randint(*DEFAULT_MAX_TOKENS)}
        if self.last_response is not None and self.rng.random() < 0.5:
            body["previous_response_id"] = self.last_response
        status, result = await self.send("/v1/responses", body, kind="responses")
        if status == 200:
            self.last_response = result["id"]
            self.report.kept_ok += 1
        elif status == 404:  # the previous response expired or was trimmed: start a new chain
            self.last_response = None

    async def messages(self) -> None:
        body = {"model": self.model, "max_tokens": self.rng.randint(*DEFAULT_MAX_TOKENS),
                "messages": [{"role": "user", "content": self.prompt()}]}
        status, _ = await self.send("/v1/messages", body, kind="messages")
        self.report.kept_ok += status == 200

    async def malformed(self) -> None:
        path, body = self.rng.choice(MALFORMED)
        self.report.started += 1
        self.report.by_kind["malformed"] = self.report.by_kind.get("malformed", 0) + 1
        epoch = self.epoch
        try:
            if isinstance(body, bytes):
                r = await self.client.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = await self.client.post(path, json=body)
        except httpx.HTTPError as exc:
            self._server_error(f"malformed {path}: {type(exc).__name__}: {exc}", epoch)
            return
        if 400 <= r.status_code < 500:
            self.report.malformed_ok += 1
        elif r.status_code == 503 and self._overlapped(epoch):
            self.report.during_restart += 1
        else:
            self.report.server_errors.append(f"malformed {path}: HTTP {r.status_code} {r.text[:200]}")

    async def any(self) -> None:
        """One action, drawn with the soak's mix."""
        draw = self.rng.random()
        for share, action in ((0.45, self.generation), (0.60, self.session_flow), (0.68, self.structured),
                              (0.76, self.tool_call), (0.84, self.responses), (0.92, self.messages)):
            if draw < share:
                return await action()
        await self.malformed()
