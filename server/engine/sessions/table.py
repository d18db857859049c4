"""Sessions: a conversation's working memory, kept resident between turns.

A session holds references on the KV blocks of its token transcript (the full blocks and
the partial last one), so the prefix cache's LRU cannot evict them. The next turn's
sequence starts from those blocks (`Sequence.resume`; the shared partial block is copied
on its first write) and prefills only the new tokens.

Tiers: "resident" (blocks pinned) or "dropped" (no pins; the transcript is kept and its
KV recomputed at the next turn, often partly from the prefix cache). Idle sessions may
pin at most `max_pinned_blocks`; over that, or when running requests need blocks, the
least recently used idle sessions are dropped first. A session with a turn is `busy` and is
never dropped mid-turn; while that turn waits for admission its pins may be released
(`release_waiting`: the turn's own sequence takes the blocks it needs when admitted). Everything here runs on the engine thread.

With a store (`--session-dir`), memory is a cache of the directory, which replicas may
share: every door first asks disk.py whether the session's file changed (`_sync`)
and loads a session it does not hold (lookup on miss), replaces a stale copy (another
replica took turns since: its resident KV is dropped and recomputed) or forgets one whose
file is gone. A turn holds the session's file lock from `begin_turn` to its commit or
abort, and so does every write of its files; a lock held elsewhere is `session_busy`.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from server.engine.memory import BlockPool
from server.engine.sessions.disk import SWEEP_INTERVAL_S, MemoryOnly, SessionDisk, StaleCopy
from server.engine.sessions.record import (
    BrokenSession, ForkPoint, Session, SessionError, SessionTurn, TurnResult, visible,
)
from server.engine.sessions.tiers import KVTiers
from server.engine.sessions.upkeep import Upkeep

__all__ = ["BrokenSession", "ForkPoint", "Session", "SessionError", "SessionTable", "SessionTurn", "TurnResult"]

if TYPE_CHECKING:
    from server.engine.sessions.offload import KVSwap
    from server.engine.sessions.store import SessionStore, Stored


class SessionTable(KVTiers, Upkeep):
    """All sessions, in least-recently-used order; owns their block pins."""

    def __init__(
        self, pool: BlockPool, max_sessions: int, max_pinned_blocks: int,
        store: "SessionStore | None" = None, swapper: "KVSwap | None" = None,
    ) -> None:
        self.pool = pool
        self.disk: SessionDisk | MemoryOnly = SessionDisk(store) if store is not None else MemoryOnly()
        self.swapper = swapper  # offload tier; without it evicted sessions are dropped
        self.broken: dict[str, BrokenSession] = {}  # session id -> its file that could not be loaded
        self.max_sessions = max_sessions
        self.max_pinned_blocks = max_pinned_blocks
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.pins: dict[int, int] = {}  # block -> number of sessions pinning it
        self.num_evictions = 0
        self.num_recomputes = 0  # turns of a dropped session (its KV recomputed)
        self.num_offloads = 0
        self.num_disk_restores = 0
        self.num_memory_restores = 0
        self.num_store_loads = 0  # sessions read from the store after start-up (a miss or a stale copy)
        self.sweep_interval_s = SWEEP_INTERVAL_S
        self._next_sweep = 0.0  # when `expire` next sweeps the store for sessions not held here
        for found in sorted(self.disk.load_all(), key=_recency):  # an earlier run's, in the dropped tier
            self._adopt(found)

    def _adopt(self, found: "Stored | BrokenSession") -> None:
        """Hold a session read from the store; a KV file left for it is used at its next turn
        (every KV write happens under the lock and for the file's current version)."""
        if isinstance(found, BrokenSession):
            self.broken[found.session_id] = found
            return
        self._room()
        session = found.session
        if self.swapper is not None:
            session.offloaded = self.swapper.find(session.session_id)
        self.sessions[session.session_id] = session
        self.broken.pop(session.session_id, None)

    def _sync(self, session_id: str) -> None:
        """Bring the copy held here in line with the store's file (see the module doc). A
        busy session is ours: its lock keeps the file unchanged."""
        held = self.sessions.get(session_id)
        if held is not None and held.busy:
            return
        change = self.disk.change(session_id, held is not None)
        if change is None:
            return
        if held is not None:  # stale: its files are another replica's now
            self._release(held)
            held.offloaded = None
            del self.sessions[session_id]
        self.broken.pop(session_id, None)
        if change.found is not None:
            self._adopt(change.found)
            self.num_store_loads += 1

    def __len__(self) -> int:
        return len(self.sessions)

    @property
    def num_pinned_blocks(self) -> int:
        """Distinct blocks held by sessions (a fork's shared blocks count once)."""
        return len(self.pins)

    def create(self, session: Session) -> Session:
        """Add `session`, saved first: a create that fails leaves nothing behind."""
        if session.session_id in self.sessions:
            raise SessionError(f"session {session.session_id!r} already exists", "session_exists")
        self._room()
        self._save(session)
        self.sessions[session.session_id] = session
        return session

    def _room(self) -> None:
        """Room for one more session in memory. With a store, memory is a cache of it: the
        least recently used idle session leaves memory (its KV evicted first; its file stays
        and a miss reads it again). Without a store, or with every session busy:
        too_many_sessions."""
        if len(self.sessions) < self.max_sessions:
            return
        idle = next((s for s in self.sessions.values() if not s.busy), None) if self.disk.keeps_files else None
        if idle is None:
            raise SessionError(f"the server holds its maximum of {self.max_sessions} sessions", "too_many_sessions")
        if idle.block_table:
            self._evict(idle)
        del self.sessions[idle.session_id]
        self.disk.forget(idle.session_id)

    def get(self, session_id: str, owner: str | None = None) -> Session:
        """The session as the store has it now; with `owner`, one that is not visible to it
        (record.visible: another key's, or made without keys) does not exist either."""
        self._sync(session_id)
        return self._get(session_id, owner)

    def _get(self, session_id: str, owner: str | None = None) -> Session:
        broken = self.broken.get(session_id)
        if broken is not None and visible(broken.owner, owner):
            raise SessionError(broken.error, "session_corrupt")
        session = self.sessions.get(session_id)
        if session is None or not session.visible_to(owner):
            raise SessionError(f"session {session_id!r} does not exist", "session_not_found")
        return session

    def touch(self, session_id: str, owner: str | None = None) -> Session:
        """`get`, and mark the session used now (its TTL and LRU place restart)."""
        session = self.get(session_id, owner)
        self._touch(session)
        return session

    def read_files(self) -> "list[Stored]":
        """The store's readable session files, for `listing` (any thread: files only)."""
        return self.disk.read_files()

    def read_expiries(self, prefix: str) -> dict[str, float]:
        """When the store's sessions named `prefix...` expire, for `trim` (any thread: files only)."""
        return self.disk.file_expiries(prefix)

    def read_expired(self, now: float) -> list[str]:
        """The store's sessions whose files say they expired by `now`, for `sweep` (any thread:
        files only)."""
        return self.disk.expired_files(now)

    def listing(self, owner: str | None, limit: int, after: str | None = None,
                files: "list[Stored] | None" = None) -> tuple[list[dict[str, Any]], bool]:
        """What the API shows of up to `limit` of `owner`'s sessions, oldest first, after
        the session id `after`; and whether more follow. `files`: `read_files()` read off
        the engine thread (without it the directory is read here)."""
        every = self.disk.every(self.sessions, files)  # with a store: its directory, every replica's sessions
        mine = sorted((s for s in every if s.visible_to(owner)), key=lambda s: (s.created, s.session_id))
        if after is not None:
            ids = [s.session_id for s in mine]
            if after not in ids:
                raise SessionError(f"session {after!r} (after) does not exist", "session_not_found")
            mine = mine[ids.index(after) + 1 :]
        return [s.info(self.pool.block_size) for s in mine[:limit]], len(mine) > limit

    def begin_turn(self, session_id: str) -> Session:
        """Start a turn. Without a copy here the session is looked up in the store; with
        one, it must still be the file's version (the one the caller built its prompt from),
        else session_busy and the copy is refreshed for the retry."""
        if session_id not in self.sessions:
            self._sync(session_id)
        session = self._get(session_id)
        if session.busy:
            raise SessionError(f"session {session_id!r} already has a turn running", "session_busy")
        try:
            self.disk.lock_turn(session_id)
        except StaleCopy:
            self._sync(session_id)  # the retry builds its prompt from the new version
            raise
        session.busy = True
        try:  # a failure here (reading its KV back, say) gives the turn back
            if session.token_ids and not session.block_table:
                if not self._restore(session):
                    self.num_recomputes += 1
            if self.swapper is not None:  # a KV file older than the coming transcript must not outlive it
                self.swapper.discard(session_id)
        except BaseException:
            self.abort_turn(session)
            raise
        self._touch(session)
        return session

    def abort_turn(self, session: Session) -> None:
        """A turn that did not finish: the session stays exactly as it was before it."""
        session.busy = False
        self.disk.unlock(session.session_id)
        self._touch(session)

    def commit_turn(self, session: Session, turn: TurnResult) -> None:
        """A finished turn becomes the session's: pin the sequence's full blocks and its
        partial tail (before the sequence frees them), then save the transcript."""
        session.busy = False
        try:
            self._touch(session)
            if session.session_id not in self.sessions:  # deleted while the turn ran
                return
            bs = self.pool.block_size
            blocks = turn.block_table[: -(-turn.num_kv_tokens // bs)]  # the full blocks and the partial tail
            self._pin(blocks)
            self._unpin(session.block_table)
            session.token_ids = list(turn.token_ids)
            session.block_table = list(blocks)
            session.block_hashes = list(turn.block_hashes[: turn.num_kv_tokens // bs])
            session.num_kv_tokens = turn.num_kv_tokens
            session.messages = turn.messages
            session.num_turns += 1
            self._save(session)  # durable before the turn's response finishes
        finally:
            self.disk.unlock(session.session_id)
        self.enforce_budget()

    def fork(self, source_id: str, new_id: str, ttl: float, owner: str | None = None,
             at: "ForkPoint | None" = None) -> Session:
        """A new session sharing every pinned block of `source_id` (refcounts); it belongs
        to `owner` (who must be able to see the source). With `at`, the child keeps only the
        source's first `at.num_messages` messages and `at.token_ids` as its transcript (a
        prefix of the source's, else session_busy: the source changed since) and shares the
        blocks under that prefix; its partial last block is copied at its first write."""
        source = self.get(source_id, owner)
        tokens, messages, kv = list(source.token_ids), list(source.messages), source.num_kv_tokens
        if at is not None:
            if source.token_ids[: len(at.token_ids)] != at.token_ids:
                raise SessionError(f"session {source_id!r} changed while forking; retry", "session_busy")
            tokens, messages = list(at.token_ids), messages[: at.num_messages]
            kv = min(kv, len(tokens))
        bs = self.pool.block_size
        child = Session(new_id, ttl, token_ids=tokens, messages=messages, metadata=dict(source.metadata),
                        num_turns=sum(m.get("role") == "assistant" for m in messages), owner=owner)
        self._touch(source)  # most recently used: the room `create` may make is never the source's KV
        self.create(child)  # saved there (a file holds no block table)
        blocks = source.block_table[: -(-kv // bs)] if kv else []
        self._pin(blocks)
        child.block_table = list(blocks)
        child.block_hashes = list(source.block_hashes[: kv // bs])
        child.num_kv_tokens = kv
        self.enforce_budget()
        return child

    def set_metadata(self, session_id: str, metadata: dict[str, Any], owner: str | None = None) -> None:
        """Replace an idle session's metadata (saved under its lock); session_busy mid-turn."""
        self._sync(session_id)
        session = self._get(session_id, owner)
        if session.busy:
            raise SessionError(f"session {session_id!r} has a turn running", "session_busy")
        try:
            self.disk.lock_turn(session_id)
        except StaleCopy:
            self._sync(session_id)
            raise
        try:
            session.metadata = dict(metadata)
            self._save(session)
        finally:
            self.disk.unlock(session_id)

    def info(self, session_id: str, owner: str | None = None) -> dict[str, Any]:
        """What the API shows of a session (see `get` for `owner`)."""
        return self.get(session_id, owner).info(self.pool.block_size)

    def delete(self, session_id: str, owner: str | None = None) -> None:
        """Forget a session and free its blocks; session_busy while a turn runs (here or, by
        its lock, on another replica). A session whose file is unreadable is deleted by the
        callers it is visible to (its owner is read from the file's first bytes; when those
        are damaged too, only a server without keys can, or an operator removes the file)."""
        self._sync(session_id)
        session = self._get(session_id, owner) if session_id not in self.broken else None
        if session is None and not visible(self.broken[session_id].owner, owner):
            raise SessionError(f"session {session_id!r} does not exist", "session_not_found")
        if session is not None and session.busy:
            raise SessionError(f"session {session_id!r} has a turn running", "session_busy")
        with self.disk.removing(session_id):  # session_busy while a turn runs on another replica
            if session is not None:
                self._release(session)
                del self.sessions[session_id]
            self.broken.pop(session_id, None)
            if self.swapper is not None:
                self.swapper.discard(session_id)

    def update(self, session_id: str, metadata: dict[str, Any], messages: list[dict[str, Any]] | None = None) -> None:
        """Replace what the API keeps beside a session's transcript (its metadata, and its
        messages if given) and save it; the transcript and its KV stay as they are."""
        session = self.get(session_id)
        if session.busy:
            raise SessionError(f"session {session_id!r} has a turn running", "session_busy")
        session.metadata = dict(metadata)
        if messages is not None:
            session.messages = list(messages)
        self._save(session)

    def _save(self, session: Session) -> None:
        self.disk.save(session)

    def _touch(self, session: Session) -> None:
        session.last_used = time.time()
        self.sessions.move_to_end(session.session_id)


def _recency(found: "Stored | BrokenSession") -> float:
    return found.session.last_used if not isinstance(found, BrokenSession) else 0.0

