"""The working memory as one JSON-ready picture: who holds which KV blocks right now.

Built on the engine thread (`LLMEngine.memory_view`) and served by `GET /v1/memory`. The
block counts partition the pool:

    total == running + sum(session.num_own_blocks) + shared + cached + free

  running   referenced by running requests only (no session pins them)
  own       pinned by exactly one session (a session's resident KV)
  shared    pinned by two or more sessions (forks share their common prefix)
  cached    refcount 0, hash kept: a prefix-cache hit may still revive them
  free      empty
"""
from __future__ import annotations

from typing import Any

from server.engine.memory import BlockPool
from server.engine.sessions import SessionTable

MAX_VIEW_SESSIONS = 200  # sessions listed, most recently used first; the rest are only counted


def memory_view(pool: BlockPool, sessions: SessionTable, num_running: int, num_waiting: int,
                owner: str | None) -> dict[str, Any]:
    """The picture for the caller `owner` (None: no API keys, every session). Sessions of
    other keys are summed into `other_sessions`, never named."""
    pins = sessions.pins  # block -> number of sessions pinning it
    pinned = len(pins)
    shared = sum(1 for n in pins.values() if n > 1)
    listed, other_count, other_blocks = [], 0, 0
    for session in reversed(sessions.sessions.values()):  # most recently used first
        own = sum(1 for b in session.block_table if pins.get(b) == 1)
        if not session.visible_to(owner):
            other_count += 1
            other_blocks += own
            continue
        listed.append({
            "id": session.session_id, "name": session.metadata.get("name"), "tier": session.tier,
            "busy": session.busy, "num_turns": session.num_turns, "num_tokens": len(session.token_ids),
            "num_resident_tokens": session.num_kv_tokens, "num_kv_blocks": len(session.block_table),
            "num_own_blocks": own, "num_shared_blocks": len(session.block_table) - own,
        })
    cached = pool.num_cached
    return {
        "object": "memory", "block_size": pool.block_size,
        "blocks": {
            "total": pool.num_total, "used": pool.num_used, "running": pool.num_used - pinned,
            "pinned": pinned, "shared": shared, "cached": cached,
            "free": pool.num_total - pool.num_used - cached,
            "max_pinned": sessions.max_pinned_blocks,
        },
        "requests": {"running": num_running, "waiting": num_waiting},
        "sessions": listed[:MAX_VIEW_SESSIONS],
        "num_sessions_not_listed": max(0, len(listed) - MAX_VIEW_SESSIONS),
        "other_sessions": {"count": other_count, "num_own_blocks": other_blocks},
        "counters": {
            "session_evictions": sessions.num_evictions, "session_offloads": sessions.num_offloads,
            "session_recomputes": sessions.num_recomputes,
            "session_restores": sessions.num_disk_restores + sessions.num_memory_restores,
        },
    }
