"""EngineStats: what a server may read about the engine, as one snapshot.

`LLMEngine.stats()` fills the engine's counters on the engine thread; `AsyncEngine` adds
its own thread's timings and publishes the snapshot for /metrics and admission.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """Counters and gauges of one moment (all zero before the engine runs)."""

    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_cached: int = 0
    kv_block_bytes: int = 0  # one block's K/V bytes at the pool's dtype (--kv-cache-dtype)
    num_running: int = 0
    num_waiting: int = 0
    num_preemptions: int = 0
    sessions_active: int = 0
    session_blocks_pinned: int = 0
    session_evictions: int = 0
    session_restores_recompute: int = 0
    session_restores_disk: int = 0
    session_restores_memory: int = 0
    session_offloads: int = 0
    spec_draft_tokens: int = 0  # speculative decoding: draft tokens proposed (server/engine/speculate.py)
    spec_accepted_tokens: int = 0  # of those, accepted by verification
    spec_verifies: int = 0  # sequence-steps that verified a draft (tokens per verify = 1 + accepted / this)
    step_seconds: float = 0.0  # engine thread inside LLMEngine.step()
    idle_seconds: float = 0.0  # engine thread blocked on an empty inbox with nothing to run
