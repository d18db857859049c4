"""The session table's upkeep, on its own schedule or the engine's: TTL expiry and the
store's sweep, trimming a family of sessions (stored responses), the pinned-block budget,
reclaiming blocks for the scheduler, saving resident KV at shutdown. A mixin of
SessionTable (table.py), split off by concern; engine thread only.
"""
from __future__ import annotations

import time

from server.engine.sessions.record import Session, SessionError


class Upkeep:
    """Table-wide housekeeping (see module doc)."""

    def expire(self, now: float | None = None, sweep: bool = True) -> list[str]:
        """Delete idle sessions whose TTL passed, and with `sweep` every `sweep_interval_s`
        those in the store that no copy here stands for, reading the store here; returns their
        ids. AsyncEngine passes `sweep` False and reads the store in a worker instead
        (`sweep_due`, then `read_expired` there, then `sweep` back on the engine thread)."""
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
        if sweep and self.sweep_due(now):
            gone += self.sweep(now)
        return gone

    def sweep_due(self, now: float | None = None) -> bool:
        """Whether the store's sweep is due (every `sweep_interval_s`, with a store only);
        True counts it as begun."""
        now = time.time() if now is None else now
        if not self.disk.keeps_files or now < self._next_sweep:
            return False
        self._next_sweep = now + self.sweep_interval_s
        return True

    def sweep(self, now: float, expired: list[str] | None = None) -> list[str]:
        """Delete the store's sessions expired by `now` that no copy here stands for at this
        moment, each under its lock and checked again there; returns their ids. `expired`: the
        candidates (`read_expired(now)`), read off the engine thread beforehand, else read here."""
        gone = self.disk.sweep(now, self.sessions, expired)
        if self.swapper is not None:
            for session_id in gone:
                self.swapper.discard(session_id)
        return gone


    def trim(self, prefix: str, keep: int, files: dict[str, float] | None = None) -> list[str]:
        """Delete idle sessions whose ids start with `prefix`, the soonest to expire first,
        until at most `keep` are left here and in the store; returns their ids. `files`: the
        store's expiries (`read_expiries(prefix)`), read off the engine thread beforehand, else
        read here; a file another replica wrote since is counted at the next trim."""
        ranked = sorted(self.disk.expiries(prefix, self.sessions, files).items(), key=lambda kv: kv[1])
        excess, gone = len(ranked) - keep, []
        for session_id, _ in ranked:
            if excess <= 0:
                break
            held = self.sessions.get(session_id)
            if held is not None and held.busy:
                continue
            try:
                self.delete(session_id)
            except SessionError as exc:  # a turn runs on another replica, or it is gone already
                excess -= exc.code == "session_not_found"
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

    def release_waiting(self, session: Session) -> bool:
        """Unpin a busy session whose turn is not running (queued, or preempted); False if it
        pins nothing. Such pins only spare the turn a recompute, and a turn that waits must
        not hold memory admission needs: turns of sessions whose pins together fill the pool
        would otherwise wait for one another for ever. The blocks become cached-free, so the
        turn still finds its full blocks by hash unless something evicts them first. Counted
        as an eviction; the caller drops the turn's `Sequence.resume`."""
        if not session.block_table:
            return False
        self._release(session)
        self.num_evictions += 1
        return True
