"""Durable session transcripts in `--session-dir`: one JSON file per session.

Each completed turn is written before its response finishes: to a temporary file, fsync,
rename over the old file, fsync the directory. A file carries a format version and a
SHA-256 of its payload; a file that fails either check makes that one session report an
error, never the server fail. At start-up sessions are found again in the "dropped"
tier: their KV is recomputed at the next turn, giving the tokens they would have given.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from server.engine.session_record import BrokenSession, Session

FORMAT_VERSION = 1
SUFFIX = ".session.json"


class SessionStore:
    """Reads and writes session transcripts (no KV) under one directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, session_id: str) -> Path:
        return self.directory / f"{session_id}{SUFFIX}"

    def save(self, session: Session) -> None:
        payload = {
            "id": session.session_id, "ttl": session.ttl, "created": session.created,
            "last_used": session.last_used, "num_turns": session.num_turns,
            "token_ids": session.token_ids, "messages": session.messages, "metadata": session.metadata,
            "owner": session.owner,
        }
        body = json.dumps(payload, sort_keys=True, ensure_ascii=False)
        record = {"format_version": FORMAT_VERSION, "sha256": _digest(body), "payload": body}
        final = self.path(session.session_id)
        tmp = final.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(record))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.directory)

    def delete(self, session_id: str) -> None:
        try:
            self.path(session_id).unlink()
            _fsync_dir(self.directory)
        except FileNotFoundError:
            pass

    def load_all(self) -> list[Session | BrokenSession]:
        found: list[Session | BrokenSession] = []
        for file in sorted(self.directory.glob(f"*{SUFFIX}")):
            session_id = file.name[: -len(SUFFIX)]
            try:
                found.append(_parse(file.read_text(encoding="utf-8"), session_id))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                found.append(BrokenSession(session_id, f"session file {file.name} is unreadable: {exc}"))
        return found


def _parse(text: str, session_id: str) -> Session:
    record = json.loads(text)
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format version {record.get('format_version')!r}, expected {FORMAT_VERSION}")
    body = record["payload"]
    if _digest(body) != record["sha256"]:
        raise ValueError("checksum mismatch")
    p = json.loads(body)
    if p["id"] != session_id:
        raise ValueError(f"file holds session {p['id']!r}")
    return Session(
        session_id, float(p["ttl"]), token_ids=[int(t) for t in p["token_ids"]], messages=list(p["messages"]),
        metadata=dict(p["metadata"]), created=float(p["created"]), last_used=float(p["last_used"]),
        num_turns=int(p["num_turns"]), owner=p.get("owner"),
    )


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
