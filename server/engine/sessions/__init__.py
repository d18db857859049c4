"""Sessions: a conversation's working memory, kept between turns (README "Sessions").

What this package owns, one concern per module:

    table.py    SessionTable: every session, its turns (begin / commit / abort), forks,
                listing, ownership checks, lookup on miss against the store
    tiers.py    where a session's KV lives: pinned in the pool, offloaded, dropped (a mixin of the table)
    upkeep.py   TTL expiry, store sweeps, trims, the pin budget, reclaim, save at shutdown (a mixin)
    record.py   Session / BrokenSession / SessionTurn / TurnResult / ForkPoint, SessionError, `visible`
    store.py    SessionStore: durable transcripts in --session-dir (one JSON file each)
    disk.py     the table's view of a store replicas may share (file versions, change checks)
    locks.py    per-session flock locks between replicas
    offload.py  KV tiers below the pool: a session's KV in a file or in host memory

Doors for the rest of the engine (everything else is this package's own): `SessionTable`
(LLMEngine holds one; the scheduler calls its `reclaim`), the records and `SessionError`
re-exported here, `SessionStore` (`store.py`) and the offload tiers `KVSwapper` /
`HostKVSwapper` (`offload.py`), which LLMEngine builds and hands to the table. Everything
runs on the engine thread except `SessionTable.read_files` and the store's reads it makes.
"""
from server.engine.sessions.record import (
    BrokenSession, ForkPoint, Session, SessionError, SessionTurn, TurnResult, visible,
)
from server.engine.sessions.table import SessionTable

__all__ = ["BrokenSession", "ForkPoint", "Session", "SessionError", "SessionTable", "SessionTurn", "TurnResult",
           "visible"]
