"""A session's record: what the session table (table.py) keeps in memory and the store
(store.py) writes to disk. Its own module so that neither imports the other."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.engine.sessions.offload import OffloadedKV


class SessionError(ValueError):
    """A session operation that cannot be done (unknown id, busy, table full)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Session:
    """Engine-side state of one conversation. `messages`/`metadata` are opaque to the engine."""

    session_id: str
    ttl: float
    token_ids: list[int] = field(default_factory=list)  # transcript exactly as the model saw it
    block_table: list[int] = field(default_factory=list)  # pinned blocks: full ones + a partial tail
    block_hashes: list[int] = field(default_factory=list)  # content hashes of the full ones
    num_kv_tokens: int = 0  # tokens (a prefix of token_ids) whose KV the pinned blocks hold
    messages: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    num_turns: int = 0
    busy: bool = False
    offloaded: "OffloadedKV | None" = None  # where its KV went when it left the pool
    owner: str | None = None  # fingerprint of the API key that created it; None: made while no keys were set

    def visible_to(self, caller: str | None) -> bool:
        """Ownership, without exceptions: see `visible`."""
        return visible(self.owner, caller)

    @property
    def tier(self) -> str:
        if self.block_table:
            return "resident"
        return "offloaded" if self.offloaded is not None else "dropped"

    def info(self, block_size: int) -> dict[str, Any]:
        return {
            "id": self.session_id, "created": int(self.created), "last_used": int(self.last_used),
            "expires_at": int(self.last_used + self.ttl), "num_turns": self.num_turns,
            "num_tokens": len(self.token_ids), "num_resident_tokens": self.num_kv_tokens,
            "num_kv_blocks": len(self.block_table), "tier": self.tier, "busy": self.busy,
            "messages": list(self.messages), "metadata": dict(self.metadata),
        }


UNKNOWN_OWNER = "?unknown"  # a file too damaged to say whose it is (no key's fingerprint looks like this)


def visible(owner: str | None, caller: str | None) -> bool:
    """Whether the session of `owner` exists for `caller` (the fingerprint of the caller's
    API key; None when the server has no keys). Without keys every session is every caller's.
    With keys a session is only its creator's: one made while no keys were set (owner None)
    or whose owner cannot be read (UNKNOWN_OWNER) belongs to no key; it expires by its TTL."""
    return caller is None or owner == caller


@dataclass
class BrokenSession:
    """A session file that could not be read back; the session answers this error to the
    callers it is visible to. `owner` comes from the file's first bytes, which hold it ahead
    of the payload (UNKNOWN_OWNER when even they are unreadable)."""

    session_id: str
    error: str
    owner: str | None = UNKNOWN_OWNER


@dataclass
class SessionTurn:
    """A sequence that is a session's turn, and the messages it adds."""

    session: Session
    new_messages: list[dict[str, Any]]


@dataclass(frozen=True)
class ForkPoint:
    """Where a fork cuts its source: the messages kept and the transcript tokens they are."""

    num_messages: int
    token_ids: list[int]


@dataclass(frozen=True)
class TurnResult:
    """What a finished turn hands its session: the transcript as the model saw it, the KV
    blocks holding its first `num_kv_tokens` tokens, and the messages with the reply."""

    token_ids: list[int]
    block_table: list[int]
    block_hashes: list[int]
    num_kv_tokens: int
    messages: list[dict[str, Any]]
