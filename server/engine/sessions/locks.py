"""Per-session locks on shared storage: replicas that share `--session-dir` never write one
session at once.

A lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on `{session_id}.lock` beside the transcript,
held for the whole of a turn (and while a session's files are deleted or its KV is
offloaded). The kernel drops it when the holding process dies, even under kill -9, so a
dead replica never leaves a session locked. flock locks belong to an open file
description: a second `SessionLocks` in the same process (another engine on the same
directory) conflicts like another process does. On NFS, Linux emulates flock with
byte-range locks that the server arbitrates (NFSv4 leases); a mount with
`local_lock=flock` or `local_lock=all` makes them node-local and unsafe here.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_SUFFIX = ".lock"


class SessionLocks:
    """Non-blocking exclusive locks, one file per session id, under one directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.held: dict[str, int] = {}  # session id -> fd of its locked file

    def path(self, session_id: str) -> Path:
        return self.directory / f"{session_id}{LOCK_SUFFIX}"

    def acquire(self, session_id: str) -> bool:
        """Take the lock; False when another holder (process or table) has it."""
        if session_id in self.held:
            return False
        fd = os.open(self.path(session_id), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self.held[session_id] = fd
        return True

    def release(self, session_id: str, remove: bool = False) -> None:
        """Drop the lock (a no-op when not held); `remove`: unlink its file first (the
        session is gone; a holder that opened the old file finds no transcript)."""
        fd = self.held.pop(session_id, None)
        if fd is None:
            return
        if remove:
            self.path(session_id).unlink(missing_ok=True)
        os.close(fd)  # closing the last descriptor releases the flock
