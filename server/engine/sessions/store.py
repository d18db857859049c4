"""Durable session transcripts in `--session-dir`: one JSON file per session.

Each completed turn is written before its response finishes: to a temporary file, fsync,
rename over the old file, fsync the directory. A file carries a format version and a
SHA-256 of its payload; a file that fails either check makes that one session report an
error, never the server fail. At start-up sessions are found again in the "dropped"
tier: their KV is recomputed at the next turn, giving the tokens they would have given.

Replicas may share the directory: `digest` tells whether a file still holds the version a
table last saw (the payload's SHA-256, read through open(), so NFS revalidates it),
`load` finds one session on a miss, and `locks` (locks.py) keep two writers apart.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

from server.engine.sessions.locks import SessionLocks
from server.engine.sessions.record import UNKNOWN_OWNER, BrokenSession, Session

FORMAT_VERSION = 1
SUFFIX = ".session.json"
SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")  # ids that name a file in the directory
UNREADABLE = "unreadable"  # digest of a file that is not a session record
# `save` writes {"format_version", "sha256", "expires_at", "owner", "payload"} in that order,
# so the digest, the expiry and the owner sit in the file's first bytes: `head` reads only
# those, and a file whose payload is damaged still says whose it is. (Files saved before
# "expires_at" or "owner" existed lack them; readers ignore keys they do not know.)
_HEAD = re.compile(rb'\{"format_version": \d+, "sha256": "([0-9a-f]{64})", (?:"expires_at": ([0-9.e+-]+), )?'
                   rb'(?:"owner": (null|"[A-Za-z0-9_?-]{1,64}"), )?"payload": ')
HEAD_BYTES = 256
OWNER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what an owner may be (key fingerprints: key_<16 hex>)


class Head(NamedTuple):
    """A session file's first bytes: its digest, when it expires (None: not recorded) and its
    owner (None: made without keys; UNKNOWN_OWNER: not recorded)."""

    digest: str
    expires_at: float | None
    owner: str | None = UNKNOWN_OWNER


class Stored(NamedTuple):
    """A session read back, and the digest of the file version it came from."""

    session: Session
    digest: str


class SessionStore:
    """Reads and writes session transcripts (no KV) under one directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.locks = SessionLocks(self.directory)

    def path(self, session_id: str) -> Path:
        return self.directory / f"{session_id}{SUFFIX}"

    def save(self, session: Session) -> str:
        """Write the session durably; returns the new file's digest."""
        payload = {
            "id": session.session_id, "ttl": session.ttl, "created": session.created,
            "last_used": session.last_used, "num_turns": session.num_turns,
            "token_ids": session.token_ids, "messages": session.messages, "metadata": session.metadata,
            "owner": session.owner,
        }
        body = json.dumps(payload, sort_keys=True, ensure_ascii=False)
        if session.owner is not None and not OWNER_ID.fullmatch(session.owner):
            raise ValueError(f"owner {session.owner!r} is not an owner id")
        record = {"format_version": FORMAT_VERSION, "sha256": _digest(body),
                  "expires_at": session.last_used + session.ttl, "owner": session.owner, "payload": body}
        final = self.path(session.session_id)
        tmp = final.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(record))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        return record["sha256"]

    def delete(self, session_id: str) -> None:
        try:
            self.path(session_id).unlink()
            _fsync_dir(self.directory)
        except FileNotFoundError:
            pass

    def ids(self) -> list[str]:
        """The session ids that have a file, sorted."""
        return sorted(file.name[: -len(SUFFIX)] for file in self.directory.glob(f"*{SUFFIX}"))

    def load_all(self) -> list[Stored | BrokenSession]:
        found = (self.load(session_id) for session_id in self.ids())
        return [f for f in found if f is not None]

    def load(self, session_id: str) -> Stored | BrokenSession | None:
        """One session's file; None when there is none (or the id cannot name one)."""
        if not SAFE_ID.fullmatch(session_id):
            return None
        file = self.path(session_id)
        try:
            return _parse(file.read_text(encoding="utf-8"), session_id)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            head = self.head(session_id)
            return BrokenSession(session_id, f"session file {file.name} is unreadable: {exc}",
                                 UNKNOWN_OWNER if head is None else head.owner)

    def digest(self, session_id: str) -> str | None:
        """The digest the session's file carries now (not verified: `load` does that);
        None without a file, UNREADABLE for one that is not a session record."""
        head = self.head(session_id)
        return head.digest if head is not None else None

    def head(self, session_id: str) -> Head | None:
        """The file's digest and expiry from its first bytes; None without a file."""
        if not SAFE_ID.fullmatch(session_id):
            return None
        try:
            with open(self.path(session_id), "rb") as f:
                first = f.read(HEAD_BYTES)
        except FileNotFoundError:
            return None
        except OSError:
            return Head(UNREADABLE, None)
        match = _HEAD.match(first)
        if match is None:
            return Head(UNREADABLE, None)
        digest, expires, owner = match.groups()
        who = UNKNOWN_OWNER if owner is None else None if owner == b"null" else owner[1:-1].decode()
        return Head(digest.decode(), float(expires) if expires else None, who)


def _parse(text: str, session_id: str) -> Stored:
    record = json.loads(text)
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format version {record.get('format_version')!r}, expected {FORMAT_VERSION}")
    body = record["payload"]
    if _digest(body) != record["sha256"]:
        raise ValueError("checksum mismatch")
    p = json.loads(body)
    if p["id"] != session_id:
        raise ValueError(f"file holds session {p['id']!r}")
    session = Session(
        session_id, float(p["ttl"]), token_ids=[int(t) for t in p["token_ids"]], messages=list(p["messages"]),
        metadata=dict(p["metadata"]), created=float(p["created"]), last_used=float(p["last_used"]),
        num_turns=int(p["num_turns"]), owner=p.get("owner"),
    )
    return Stored(session, record["sha256"])


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
