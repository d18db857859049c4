"""The KV tiers of sessions: block pins, eviction to the offload tier (or dropping), and
restoring offloaded KV into the pool. A mixin of SessionTable (table.py), split off by
concern; it works on the table's `pool`, `pins`, `swapper`, `disk` and counters, on the
engine thread like the rest of the table.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from server.engine.sessions.record import Session

if TYPE_CHECKING:
    from server.engine.sessions.offload import OffloadedKV


class KVTiers:
    """Where a session's KV lives: pinned in the pool, offloaded, or dropped."""

    def _restore(self, session: Session) -> bool:
        """Bring an offloaded session's KV back into the pool (blocks still cached in the
        pool are re-acquired, the rest read from disk). False: it will be recomputed."""
        offloaded, session.offloaded = session.offloaded, None
        if offloaded is None or self.swapper is None:
            return False
        saved = self.swapper.read(offloaded, session.session_id)
        self.swapper.discard(session.session_id)
        if saved is None:
            return False
        hits = self.pool.lookup(saved.block_hashes)
        missing = len(saved.block_hashes) - len(hits)
        if not self.pool.make_room(lambda: missing + self.pool.num_acquirable_free(hits), self.reclaim):
            return False
        self._pin(hits)
        fresh = self.pool.allocate(missing)
        try:
            self.swapper.write_blocks(saved, len(hits), fresh)
        except BaseException:  # nothing half-restored stays pinned
            self.pool.free(fresh)
            self._unpin(hits)
            raise
        for block, content in zip(fresh, saved.block_hashes[len(hits):]):
            self.pool.register(block, content)
            self.pins[block] = self.pins.get(block, 0) + 1
        session.block_table = hits + fresh
        session.block_hashes = list(saved.block_hashes)
        session.num_kv_tokens = len(session.block_table) * self.pool.block_size
        if missing and offloaded.path is not None:
            self.num_disk_restores += 1
        else:  # from host memory, or every block was still cached in the pool
            self.num_memory_restores += 1
        return True

    def _evict(self, session: Session) -> None:
        if self.swapper is not None and session.block_hashes:
            session.offloaded = self._write_kv(session)
            self.num_offloads += session.offloaded is not None
        self._release(session)
        self.num_evictions += 1

    def _write_kv(self, session: Session) -> "OffloadedKV | None":
        """Save the session's full blocks, only while it is locked and current (see
        SessionDisk.current). None: not written (the KV will be recomputed)."""
        assert self.swapper is not None
        with self.disk.current(session.session_id) as current:
            return self.swapper.save(session.session_id, *self._full_blocks(session)) if current else None

    def _release(self, session: Session) -> None:
        self._unpin(session.block_table)  # blocks become cached-free: still findable by hash
        session.block_table, session.block_hashes, session.num_kv_tokens = [], [], 0

    @staticmethod
    def _full_blocks(session: Session) -> tuple[list[int], list[int]]:
        """(full blocks, their hashes): what is worth saving (the tail is recomputed)."""
        return session.block_table[: len(session.block_hashes)], session.block_hashes

    def _pin(self, blocks: list[int]) -> None:
        self.pool.acquire(blocks)
        for b in blocks:
            self.pins[b] = self.pins.get(b, 0) + 1

    def _unpin(self, blocks: list[int]) -> None:
        self.pool.free(blocks)
        for b in blocks:
            self.pins[b] -= 1
            if not self.pins[b]:
                del self.pins[b]
