"""The session table's view of its store, which replicas may share (README "Scaling out").

`SessionDisk` remembers which file version (payload digest) each copy held in memory came
from, tells the table when a file changed under it (another replica took a turn, deleted
the session, or a copy was never held: lookup on miss), and wraps the per-session locks
(locks.py): a turn holds its session's lock from start to commit or abort, and
deletes and KV writes take it too, so two replicas never write one session at once.
`sweep` deletes the expired sessions that no copy here stands for (their replica may be
gone, or a copy left memory), reading only each file's first bytes; `expired_files`, the
directory-wide part of that reading, may run in a worker first.
`MemoryOnly` is the same interface without a store (nothing to read, lock or write).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Container, Iterator, Mapping

from server.engine.sessions.record import BrokenSession, Session, SessionError
from server.engine.sessions.store import Head, SessionStore, Stored

SWEEP_INTERVAL_S = 60.0  # how often `SessionTable.expire` sweeps the store for expired sessions


@dataclass(frozen=True)
class Change:
    """The file no longer holds the version held here: what it holds now (None: no file)."""

    found: Stored | BrokenSession | None


class StaleCopy(SessionError):
    """A turn's session changed on another replica after its prompt was built from it."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} changed on another replica while this turn was "
                         "prepared; send it again", "session_busy")


def busy_elsewhere(session_id: str) -> SessionError:
    return SessionError(f"session {session_id!r} has a turn running on another replica", "session_busy")


class SessionDisk:
    """Digests of the versions held, change checks and locks over one SessionStore."""

    keeps_files = True  # a session not held in memory is still in the store

    def __init__(self, store: SessionStore) -> None:
        self.store = store
        self.digests: dict[str, str] = {}  # session id -> digest of the file version held in memory

    def load_all(self) -> list[Stored | BrokenSession]:
        found = self.store.load_all()
        self.digests.update((f.session.session_id, f.digest) for f in found if isinstance(f, Stored))
        return found

    def change(self, session_id: str, held: bool) -> Change | None:
        """None when the copy held here (`held`) is the file's current version; else what the
        file holds now, read and remembered as the version held from here on."""
        digest = self.store.digest(session_id)
        if held and digest == self.digests.get(session_id):
            return None
        self.digests.pop(session_id, None)
        found = self.store.load(session_id) if digest is not None else None
        if isinstance(found, Stored):
            self.digests[session_id] = found.digest
        return Change(found)

    def save(self, session: Session) -> None:
        self.digests[session.session_id] = self.store.save(session)

    def forget(self, session_id: str) -> None:
        """The copy held in memory is gone (its file stays)."""
        self.digests.pop(session_id, None)

    def lock_turn(self, session_id: str) -> None:
        """The session's lock for a turn. busy_elsewhere while another holder has it;
        StaleCopy (lock not kept) when the file changed since the copy held was read."""
        if not self.store.locks.acquire(session_id):
            raise busy_elsewhere(session_id)
        if self.store.digest(session_id) != self.digests.get(session_id):
            self.store.locks.release(session_id)
            raise StaleCopy(session_id)

    def unlock(self, session_id: str) -> None:
        self.store.locks.release(session_id)

    @contextlib.contextmanager
    def removing(self, session_id: str) -> Iterator[None]:
        """Hold the lock while the session is deleted, then delete its files and lock file."""
        if not self.store.locks.acquire(session_id):
            raise busy_elsewhere(session_id)
        try:
            yield
            self.store.delete(session_id)
            self.digests.pop(session_id, None)
        finally:
            self.store.locks.release(session_id, remove=True)

    @contextlib.contextmanager
    def current(self, session_id: str) -> Iterator[bool]:
        """True while locked and the copy held is the file's version: only then may its KV
        be written (a stale copy never overwrites another replica's KV file)."""
        if not self.store.locks.acquire(session_id):
            yield False
            return
        try:
            yield self.store.digest(session_id) == self.digests.get(session_id)
        finally:
            self.store.locks.release(session_id)

    def expired_files(self, now: float) -> list[str]:
        """The sessions whose files say they expired by `now`, from their first bytes (an older
        file without an expiry is read whole), for `sweep`. Any thread: it reads files only,
        and no state of the table."""
        return [sid for sid in self.store.ids() if self._expired(sid, self.store.head(sid), now)]

    def sweep(self, now: float, held: Container[str], expired: list[str] | None = None) -> list[str]:
        """Delete the files of the expired sessions not `held` here (`expired`:
        `expired_files(now)`, read beforehand off the engine thread; else read now), each under
        its lock and checked again there (a turn elsewhere may have renewed it); returns their ids."""
        gone = []
        for sid in self.expired_files(now) if expired is None else expired:
            if sid in held:  # held now: a copy here stands for it (restored since `expired` was read)
                continue
            if not self.store.locks.acquire(sid):  # a turn is running somewhere
                continue
            try:
                if self._expired(sid, self.store.head(sid), now):
                    self.store.delete(sid)
                    self.digests.pop(sid, None)
                    gone.append(sid)
            finally:
                self.store.locks.release(sid, remove=sid in gone)
        return gone

    def _expired(self, session_id: str, head: Head | None, now: float) -> bool:
        if head is not None and head.expires_at is not None:
            return now > head.expires_at
        found = self.store.load(session_id) if head is not None else None  # an older file: read it whole
        return isinstance(found, Stored) and now > found.session.last_used + found.session.ttl

    def read_files(self) -> list[Stored]:
        """Every readable session file in the directory. Any thread: it reads files only
        (written by rename, so never half), and no state of the table."""
        return [f for f in self.store.load_all() if isinstance(f, Stored)]

    def every(self, held: Mapping[str, Session], files: list[Stored] | None = None) -> list[Session]:
        """Every readable session in the directory (`files`: `read_files()`, read beforehand
        off the engine thread; else read now), the copies held here standing for their files
        where current (they know their resident KV)."""
        found = []
        for stored in self.read_files() if files is None else files:
            sid = stored.session.session_id
            current = sid in held and self.digests.get(sid) == stored.digest
            found.append(held[sid] if current else stored.session)
        return found

    def file_expiries(self, prefix: str) -> dict[str, float]:
        """When each session file whose id starts with `prefix` expires, from its first bytes
        (0 when unknown). Any thread: it reads files only, and no state of the table."""
        found = {}
        for sid in self.store.ids():
            if sid.startswith(prefix):
                head = self.store.head(sid)
                found[sid] = head.expires_at if head is not None and head.expires_at is not None else 0.0
        return found

    def expiries(self, prefix: str, held: Mapping[str, Session],
                 files: dict[str, float] | None = None) -> dict[str, float]:
        """When each session whose id starts with `prefix` expires, held here or only in the
        directory (`files`: `file_expiries(prefix)`, read beforehand off the engine thread;
        else read now). The copies held here stand for their files."""
        found = self.file_expiries(prefix) if files is None else dict(files)
        found.update((sid, s.last_used + s.ttl) for sid, s in held.items() if sid.startswith(prefix))
        return found


class MemoryOnly:
    """SessionDisk's interface without a store: sessions live in memory only."""

    keeps_files = False

    def load_all(self) -> list[Stored | BrokenSession]:
        return []

    def change(self, session_id: str, held: bool) -> Change | None:
        return None if held else Change(None)

    def save(self, session: Session) -> None:
        pass

    def forget(self, session_id: str) -> None:
        pass

    def lock_turn(self, session_id: str) -> None:
        pass

    def unlock(self, session_id: str) -> None:
        pass

    def removing(self, session_id: str) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def current(self, session_id: str) -> contextlib.nullcontext[bool]:
        return contextlib.nullcontext(True)

    def expired_files(self, now: float) -> list[str]:
        return []

    def sweep(self, now: float, held: Container[str], expired: list[str] | None = None) -> list[str]:
        return []

    def read_files(self) -> list[Stored]:
        return []

    def every(self, held: Mapping[str, Session], files: list[Stored] | None = None) -> list[Session]:
        return list(held.values())

    def file_expiries(self, prefix: str) -> dict[str, float]:
        return {}

    def expiries(self, prefix: str, held: Mapping[str, Session],
                 files: dict[str, float] | None = None) -> dict[str, float]:
        return {sid: s.last_used + s.ttl for sid, s in held.items() if sid.startswith(prefix)}
