"""The server's own view during a run: `/metrics` (Prometheus text) polled every
`interval_s`. workmem's `workmem_*` names are read; vLLM's `vllm:*` and llama-server's
`llamacpp:*` equivalents too where they exist. Labelled samples of one name are summed.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import httpx

# series name -> metric names tried in order (the first one present wins)
GAUGES = {
    "kv_blocks_used": ("workmem_kv_blocks_used",),
    "kv_blocks_total": ("workmem_kv_blocks_total",),
    "kv_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "llamacpp:kv_cache_usage_ratio"),
    "running": ("workmem_num_requests_running", "vllm:num_requests_running", "llamacpp:requests_processing"),
    "waiting": ("workmem_num_requests_waiting", "vllm:num_requests_waiting", "llamacpp:requests_deferred"),
    "sessions_active": ("workmem_sessions_active",),
}
COUNTERS = (
    "workmem_generation_tokens_total", "workmem_prompt_tokens_total", "workmem_prefix_cache_hits_total",
    "workmem_prefix_cache_queries_total", "workmem_num_preemptions_total", "workmem_session_evictions_total",
)


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {metric name: value}, labelled samples summed."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, rest = line.partition("} ") if "{" in line else line.partition(" ")
        name = head.split("{", 1)[0].strip()
        try:
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        out[name] = out.get(name, 0.0) + value
    return out


def gauges(sample: dict[str, float]) -> dict[str, float]:
    """One scrape -> {series name: value}; `kv_usage` is a 0..1 fraction."""
    out = {}
    for series, names in GAUGES.items():
        for name in names:
            if name in sample:
                out[series] = sample[name]
                break
    if "kv_blocks_used" in out and out.get("kv_blocks_total"):
        out["kv_usage"] = out["kv_blocks_used"] / out["kv_blocks_total"]
    return out


@dataclass
class Scraper:
    """Polls `/metrics` in the background between `start()` and `stop()`; `series` holds
    `t_s` (seconds since start) and one list per gauge, `counters_delta` the change of
    each workmem counter over the run."""

    client: httpx.AsyncClient
    interval_s: float
    available: bool = False
    t0: float = 0.0
    series: dict[str, list[float]] = field(default_factory=dict)
    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    _task: asyncio.Task | None = None

    async def scrape(self) -> dict[str, float] | None:
        try:
            r = await self.client.get("/metrics")
        except httpx.HTTPError:
            return None
        return parse_prometheus(r.text) if r.status_code == 200 else None

    async def start(self) -> None:
        self.t0 = time.perf_counter()
        sample = await self.scrape()
        self.available = bool(sample) and bool(gauges(sample) or set(COUNTERS) & set(sample))
        if self.available:
            self.first = self.last = sample
            self._record(sample)
            self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if (sample := await self.scrape()) is not None:
                self.last = sample
                self._record(sample)

    def _record(self, sample: dict[str, float]) -> None:
        self.series.setdefault("t_s", []).append(time.perf_counter() - self.t0)
        for name, value in gauges(sample).items():
            self.series.setdefault(name, []).append(value)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            if (sample := await self.scrape()) is not None:
                self.last = sample
                self._record(sample)

    def result(self) -> dict | None:
        """`server_metrics` of the result JSON (None when the server exposes none)."""
        if not self.available:
            return None
        deltas = {n: self.last[n] - self.first[n] for n in COUNTERS if n in self.first and n in self.last}
        return {"series": self.series, "counters_delta": deltas}
