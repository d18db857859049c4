"""Prometheus metrics. One `Metrics` per app (its own registry, no global state).

Engine gauges are read at scrape time from the engine thread's published snapshot;
request counters and latency histograms are recorded by the API as outputs arrive.
"""
from __future__ import annotations

import os
import threading
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.async_engine import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)


class _EngineCollector:
    """Exposes the engine snapshot as gauges at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.stats = stats

    def collect(self):
        s = self.stats()
        for name, doc, value in (
            ("workmem_kv_blocks_total", "KV cache blocks in the pool", s.kv_blocks_total),
            ("workmem_kv_blocks_used", "KV blocks with refcount > 0", s.kv_blocks_used),
            ("workmem_kv_blocks_cached", "Free KV blocks still holding a prefix hash", s.kv_blocks_cached),
            ("workmem_kv_block_bytes", "Bytes of K/V per block at the pool's dtype (--kv-cache-dtype)",
             s.kv_block_bytes),
            ("workmem_num_requests_running", "Sequences running in the engine", s.num_running),
            ("workmem_num_requests_waiting", "Sequences waiting for admission", s.num_waiting),
            ("workmem_sessions_active", "Sessions in the session table", s.sessions_active),
            ("workmem_session_blocks_pinned", "KV blocks pinned by idle or running sessions", s.session_blocks_pinned),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily(
            "workmem_num_preemptions", "Sequences preempted for lack of KV blocks", value=s.num_preemptions
        )
        yield CounterMetricFamily(
            "workmem_session_evictions", "Idle sessions whose KV left the pool", value=s.session_evictions
        )
        yield CounterMetricFamily(
            "workmem_engine_step_seconds", "Engine thread time inside step() (model, scheduler, detokenizer)",
            value=s.step_seconds,
        )
        yield CounterMetricFamily(
            "workmem_engine_idle_seconds", "Engine thread time waiting with no request to run", value=s.idle_seconds
        )
        yield CounterMetricFamily("workmem_session_offloads", "Session KV offloads to disk", value=s.session_offloads)
        yield from _speculation_metrics(s)
        restores = CounterMetricFamily(
            "workmem_session_restores", "Session turns whose KV was brought back", labels=["source"]
        )
        for source, value in (("memory", s.session_restores_memory), ("disk", s.session_restores_disk),
                              ("recompute", s.session_restores_recompute)):
            restores.add_metric([source], value)
        yield restores


def _speculation_metrics(s: EngineStats):
    """Speculative decoding (--speculative-method): draft tokens proposed and accepted, and
    the mean acceptance length (tokens a verifying step gains: accepted + the one sampled)."""
    yield CounterMetricFamily("workmem_spec_draft_tokens", "Draft tokens proposed by speculative decoding",
                              value=s.spec_draft_tokens)
    yield CounterMetricFamily("workmem_spec_accepted_tokens", "Draft tokens accepted by verification",
                              value=s.spec_accepted_tokens)
    yield CounterMetricFamily("workmem_spec_verifies", "Sequence-steps that verified a draft", value=s.spec_verifies)
    mean = 1 + s.spec_accepted_tokens / s.spec_verifies if s.spec_verifies else 0.0
    yield GaugeMetricFamily("workmem_spec_mean_acceptance_length",
                            "Tokens per verifying step (1 + accepted / verifies; 0 before any)", value=mean)


class Metrics:
    """The server's metrics; `render()` gives the Prometheus text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open fds
        r = self.registry
        threads = Gauge("workmem_process_threads", "OS threads of the server process (torch's pools included)",
                        registry=r)
        threads.set_function(_os_threads)
        self.prefix_queries = Counter("workmem_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r)
        self.prefix_hits = Counter("workmem_prefix_cache_hits", "Prompt tokens served by the prefix cache", registry=r)
        self.prompt_tokens = Counter("workmem_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("workmem_generation_tokens", "Tokens generated", registry=r)
        self.request_success = Counter(
            "workmem_request_success", "Finished sequences by finish reason", ["finished_reason"], registry=r
        )
        self.ttft = Histogram("workmem_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("workmem_inter_token_latency_seconds", "Time between tokens of a sequence", buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("workmem_e2e_request_latency_seconds", "Request latency", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("workmem_request_queue_time_seconds", "Time waiting before first scheduled", buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _os_threads() -> float:
    """The process's OS threads (Linux /proc; elsewhere the Python threads)."""
    try:
        return float(len(os.listdir("/proc/self/task")))
    except OSError:
        return float(threading.active_count())
