"""The session table's upkeep, on its own schedule or the engine's: TTL expiry and the
store's sweep, trimming a family of sessions (stored responses), the pinned-block budget,
reclaiming blocks for the scheduler, saving resident KV at shutdown. A mixin of
SessionTable (table.py), split off by concern; engine thread only.
"""
from __future__ import annotations

import time

from server.engine.sessions.record import SessionError


class Upkeep:
    """Table-wide housekeeping (see module doc)."""

    def expire(self, now: float | None = None) -> list[str]:
        """Delete idle sessions whose TTL passed, and every `sweep_interval_s` those in the
        store that no copy here stands for; returns their ids."""
        now = time.time() if now is None else now
        gone = []
        for session_id in [s.session_id for s in self.sessions.values() if not s.busy and now > s.last_used + s.ttl]:
            self._sync(session_id)  # another replica may have used it since
            session = self.sessions.get(session_id)
            if session is None or session.busy or now <= session.last_used + session.ttl:
                continue
            try:
                self.delete(session_id)
            except SessionError:  # a turn began on another replica
                continue
            gone.append(session_id)
        if now >= self._next_sweep:
            self._next_sweep = now + self.sweep_interval_s
            for session_id in self.disk.sweep(now, self.sessions):
                if self.swapper is not None:
                    self.swapper.discard(session_id)
                gone.append(session_id)
        return gone


    def trim(self, prefix: str, keep: int) -> list[str]:
        """Delete idle sessions whose ids start with `prefix`, the soonest to expire first,
        until at most `keep` are left here and in the store; returns their ids."""
        ranked = sorted(self.disk.expiries(prefix, self.sessions).items(), key=lambda kv: kv[1])
        excess, gone = len(ranked) - keep, []
        for session_id, _ in ranked:
            if excess <= 0:
                break
            held = self.sessions.get(session_id)
            if held is not None and held.busy:
                continue
            try:
                self.delete(session_id)
            except SessionError:  # a turn runs on another replica
                continue
            gone.append(session_id)
            excess -= 1
        return gone


    def save_all(self) -> int:
        """At graceful shutdown: write every resident session's KV to disk so the next
        run restores it instead of recomputing. Returns how many were saved."""
        if self.swapper is None:
            return 0
        saved = 0
        for session in self.sessions.values():
            if session.block_table and self._write_kv(session) is not None:
                saved += 1
        return saved

    def enforce_budget(self) -> None:
        """Drop LRU idle sessions until the pinned blocks fit `max_pinned_blocks`."""
        for session in list(self.sessions.values()):
            if self.num_pinned_blocks <= self.max_pinned_blocks:
                return
            if not session.busy and session.block_table:
                self._evict(session)

    def reclaim(self) -> bool:
        """Drop the least recently used idle resident session; False if there is none."""
        for session in self.sessions.values():
            if not session.busy and session.block_table:
                self._evict(session)
                return True
        return False
