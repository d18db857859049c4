"""Stored responses are sessions (no second store).

A response created with `store: true` is the session named by its id (`resp_...`): its
transcript is the conversation up to and including this response's output, its KV stays
resident by the session rules (TTL, --max-sessions, the pinned-memory budget, offload,
--session-dir across restarts and replicas, owner = the API key that made it). A response
that continues `previous_response_id` is a fork of that response's session (every KV block
shared, none copied) whose turn adds the new input and output, so its prefill covers only
the new tokens, and an older response can be continued any number of times (branches).

The session's metadata holds what the API shows: {"kind": "response", "instructions",
"response": the response object, "input_items": this request's items}. At most
`max_stored_responses` response sessions exist (memory and directory): creating one past
that deletes those expiring soonest. Everything here runs on the engine thread
(`AsyncEngine.call`) but `read_stored_responses`, which a worker runs first.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from server.engine.sessions import Session, SessionError

PREFIX = "resp_"
KIND = "response"
CONTINUABLE = ("completed", "incomplete")  # a response whose output is in its transcript


def new_response_id(replica_id: str) -> str:
    """`resp_<replica>.<random>` with a replica id (a proxy routes GET/DELETE by it, as for
    sessions), else `resp_<random>`."""
    token = secrets.token_urlsafe(18)
    return f"{PREFIX}{replica_id}.{token}" if replica_id else f"{PREFIX}{token}"


class PreviousResponseError(ValueError):
    """`previous_response_id` names nothing this caller can continue."""


@dataclass(frozen=True)
class Previous:
    """What a continuation starts from: the previous response's transcript and messages."""

    token_ids: list[int]
    messages: list[dict[str, Any]]
    instructions: str | None


def _response_session(engine, response_id: str, owner: str | None) -> Session:
    try:
        session = engine.sessions.get(response_id, owner)
    except SessionError as exc:
        if exc.code != "session_not_found":
            raise
        session = None
    if session is None or session.metadata.get("kind") != KIND:
        raise SessionError(f"response {response_id!r} does not exist", "session_not_found")
    return session


def open_response(engine, response_id: str, previous_id: str | None, owner: str | None, ttl: float,
                  keep: int, store: bool, files: dict[str, float] | None = None) -> Previous | None:
    """Read the previous response (if any) and, with `store`, make this response's session:
    a fork of the previous one's, or a new empty one, trimming the stored responses to `keep`
    (`files`: the store's response files and expiries, `read_stored_responses`, read off the
    engine thread). PreviousResponseError for a previous response this caller cannot continue."""
    previous = None
    if previous_id is not None:
        try:
            prev = _response_session(engine, previous_id, owner)
        except SessionError as exc:
            raise PreviousResponseError(f"previous response {previous_id!r} not found") from exc
        status = (prev.metadata.get("response") or {}).get("status", "in_progress")
        if status not in CONTINUABLE:
            raise PreviousResponseError(f"previous response {previous_id!r} is {status}; only a completed or "
                                        "incomplete response can be continued")
        engine.sessions.touch(previous_id, owner)  # most recent: the trim below keeps it
        previous = Previous(list(prev.token_ids), list(prev.messages), prev.metadata.get("instructions"))
    if not store:
        return previous
    gone = engine.sessions.trim(PREFIX, max(keep - 1, 1), files)
    files = None if files is None else {sid: t for sid, t in files.items() if sid not in gone}
    metadata = {"kind": KIND}
    if previous_id is not None:
        child = engine.sessions.fork(previous_id, response_id, ttl, owner)
        engine.sessions.update(response_id, metadata, child.messages)
    else:
        engine.sessions.create(Session(response_id, ttl, metadata=metadata, owner=owner))
    engine.sessions.trim(PREFIX, keep, files)
    return previous


def read_stored_responses(engine) -> dict[str, float]:
    """The store's response files and when each expires, read from their first bytes (any
    thread: files only), for `open_response`: a directory of them read on the engine thread
    would stall every stream."""
    return engine.read_session_expiries(PREFIX)


def save_response(engine, response_id: str, response: dict, input_items: list[dict], instructions: str | None,
                  messages: list[dict] | None) -> None:
    """The finished response, its input items and (when its turn committed) the messages
    the transcript stands for, kept with its session."""
    metadata = {"kind": KIND, "instructions": instructions, "response": response, "input_items": input_items}
    engine.sessions.update(response_id, metadata, messages)


def get_response(engine, response_id: str, owner: str | None) -> dict[str, Any]:
    """{"response": ..., "input_items": [...]} of a stored response; session_not_found for
    an unknown one, another key's, or one still running."""
    session = _response_session(engine, response_id, owner)
    if "response" not in session.metadata:
        raise SessionError(f"response {response_id!r} is still in progress", "session_busy")
    return {"response": session.metadata["response"], "input_items": list(session.metadata["input_items"])}


def delete_response(engine, response_id: str, owner: str | None) -> None:
    _response_session(engine, response_id, owner)
    engine.sessions.delete(response_id, owner)
