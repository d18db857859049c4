"""Replicas sharing one --session-dir, at the engine level: two engines in one process on
one directory behave like two replicas (flock locks belong to open files, so two tables
conflict as two processes do). A session one replica does not hold is found on disk, a
stale copy is refreshed, a turn holds the session's lock, and nobody overwrites what
another replica wrote."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from server.engine.sessions.locks import SessionLocks
from server.engine.sessions import Session, SessionError
from tests.test_sessions_engine import GREEDY, conversation, ids, make_engine, run

TURNS = [ids(9, 70), ids(6, 71), ids(7, 72), ids(5, 73)]


@pytest.fixture
def expected(tiny_checkpoint) -> list[list[int]]:
    alone = make_engine(tiny_checkpoint)
    alone.sessions.create(Session("s", ttl=600))
    return conversation(alone, "s", TURNS)


@pytest.fixture
def replicas(tiny_checkpoint, tmp_path):
    return make_engine(tiny_checkpoint, session_dir=str(tmp_path)), make_engine(tiny_checkpoint, session_dir=str(tmp_path))


def test_turns_alternate_between_replicas_with_identical_tokens(replicas, expected):
    a, b = replicas  # both started before the session existed: b finds it on a miss
    a.sessions.create(Session("s", ttl=600))
    got = conversation(a, "s", TURNS[:1])
    got += conversation(b, "s", TURNS[1:2])
    assert b.sessions.num_store_loads == 1 and b.sessions.num_recomputes == 1
    assert a.sessions.get("s").tier == "dropped"  # its resident copy was stale: dropped, reloaded
    got += conversation(a, "s", TURNS[2:3])
    got += conversation(b, "s", TURNS[3:])
    assert got == expected
    assert a.sessions.get("s").num_turns == b.sessions.get("s").num_turns == 4
    assert a.pool.num_used == a.sessions.num_pinned_blocks  # the stale copy's pins were released


def test_a_turn_locks_the_session_against_the_other_replica(replicas):
    a, b = replicas
    a.sessions.create(Session("s", ttl=600))
    prompt = a.sessions.get("s").token_ids + TURNS[0]
    a.add_request("a1", prompt, GREEDY, session_id="s", new_messages=[])
    for attempt in (lambda: b.add_request("b1", prompt, GREEDY, session_id="s"), lambda: b.sessions.delete("s")):
        with pytest.raises(SessionError, match="another replica") as err:
            attempt()
        assert err.value.code == "session_busy"
    while a.has_unfinished():
        a.step()
    assert not b.has_unfinished() and b.sessions.get("s").num_turns == 1  # b sees a's committed turn
    assert run(b, "b2", b.sessions.get("s").token_ids + TURNS[1], "s")[0]


def test_a_prompt_built_from_a_version_replaced_meanwhile_is_refused(replicas, expected):
    a, b = replicas
    a.sessions.create(Session("s", ttl=600))
    conversation(a, "s", TURNS[:1])
    stale_prompt = a.sessions.get("s").token_ids + TURNS[1]  # a's snapshot ...
    conversation(b, "s", TURNS[1:2])  # ... then b takes a turn
    with pytest.raises(SessionError, match="changed on another replica") as err:
        a.add_request("late", stale_prompt, GREEDY, session_id="s")
    assert err.value.code == "session_busy"
    assert conversation(a, "s", TURNS[2:3]) == expected[2:3]  # the retry, from the new version


def test_listing_reads_the_directory_and_deletes_are_seen_everywhere(replicas):
    a, b = replicas
    a.sessions.create(Session("from-a", ttl=600, owner="k1"))
    b.sessions.create(Session("from-b", ttl=600, owner="k1"))
    b.sessions.create(Session("other-key", ttl=600, owner="k2"))
    for engine in (a, b):
        infos, more = engine.sessions.listing("k1", limit=10)
        assert sorted(i["id"] for i in infos) == ["from-a", "from-b"] and not more
    with pytest.raises(SessionError, match="does not exist"):
        a.sessions.get("other-key", owner="k1")
    b.sessions.delete("from-a", owner="k1")
    with pytest.raises(SessionError, match="does not exist"):
        a.sessions.get("from-a")
    assert "from-a" not in a.sessions.sessions
    assert [i["id"] for i in a.sessions.listing(None, limit=10)[0]] == ["from-b", "other-key"]


def test_expiry_keeps_a_session_another_replica_used_since(replicas):
    a, b = replicas
    a.sessions.create(Session("s", ttl=100))
    conversation(a, "s", TURNS[:1])
    first_use = a.sessions.sessions["s"].last_used
    b.sessions.sessions.clear()  # b looks it up afresh ...
    conversation(b, "s", TURNS[1:2])
    b.sessions.sessions["s"].last_used = first_use + 50  # ... and used it 50 s later
    b.sessions._save(b.sessions.sessions["s"])
    assert a.expire_sessions(now=first_use + 120) == []  # past a's copy, not past b's use
    assert a.sessions.get("s").num_turns == 2
    assert a.expire_sessions(now=first_use + 151) == ["s"]
    with pytest.raises(SessionError, match="does not exist"):
        b.sessions.get("s")


def test_a_stale_copy_never_overwrites_the_kv_file_of_the_replica_that_moved_on(replicas, expected, tmp_path):
    a, b = replicas
    a.sessions.create(Session("s", ttl=600))
    conversation(a, "s", TURNS[:1])  # a holds the session resident
    conversation(b, "s", TURNS[1:2])
    assert b.sessions.reclaim() and (tmp_path / "s.kv.pt").exists()  # b offloads its KV to the shared file
    before = (tmp_path / "s.kv.pt").read_bytes()
    assert a.sessions.reclaim()  # a evicts its stale resident copy: it must not write the file
    assert a.sessions.num_offloads == 0 and (tmp_path / "s.kv.pt").read_bytes() == before
    assert conversation(b, "s", TURNS[2:3]) == expected[2:3]
    assert b.sessions.num_disk_restores + b.sessions.num_memory_restores == 1  # its own KV came back


def test_ids_that_cannot_name_a_file_are_unknown(replicas, tmp_path):
    a, _ = replicas
    (tmp_path.parent / "outside.session.json").write_text("{}")
    for bad in ("../outside", ".hidden", "a/b", "x" * 200, ""):
        with pytest.raises(SessionError) as err:
            a.sessions.get(bad)
        assert err.value.code == "session_not_found"


def test_the_kernel_releases_a_lock_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from server.engine.sessions.locks import SessionLocks
        assert SessionLocks({str(tmp_path)!r}).acquire("s")
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        mine = SessionLocks(tmp_path)
        assert not mine.acquire("s")
        holder.kill()  # kill -9: no cleanup runs in the holder
        holder.wait()
        assert mine.acquire("s") and not mine.acquire("s")  # held now, once
        mine.release("s")
        assert mine.acquire("s")
    finally:
        holder.kill()
        holder.wait()


def test_a_replica_names_itself_in_the_ids_it_creates_as_the_nginx_map_expects():
    from pathlib import Path

    from server.api.session_routes import new_session_id
    from server.api.state import ServerSettings
    from server.engine.sessions.store import SAFE_ID

    conf = (Path(__file__).resolve().parents[1] / "deploy" / "nginx.conf").read_text()
    routes = dict(re.findall(r"~\^/v1/sessions/(sess_\S+)\s+(\w+);", conf))
    assert routes  # the map's patterns, e.g. sess_workmem-0\. -> workmem_0
    for replica in ("workmem-0", "workmem-1"):
        sid = new_session_id(ServerSettings("m", replica_id=replica).replica_id)
        assert SAFE_ID.fullmatch(sid)
        assert [u for pattern, u in routes.items() if re.match(pattern, sid)] == ["workmem_" + replica[-1]]
    assert not any(re.match(p, new_session_id("")) for p in routes)  # no replica id: least connections
    for bad in ("Upper", "has.dot", "-dash-first", "x" * 41, "sp ace"):
        with pytest.raises(ValueError, match="replica id"):
            ServerSettings("m", replica_id=bad)


def test_with_a_store_max_sessions_bounds_memory_not_the_directory(tiny_checkpoint, tmp_path):
    a = make_engine(tiny_checkpoint, session_dir=str(tmp_path), max_sessions=2)
    for sid in ("s1", "s2"):
        a.sessions.create(Session(sid, ttl=600))
    conversation(a, "s2", TURNS[:1])  # s2 resident, s1 the least recently used
    a.sessions.create(Session("s3", ttl=600))  # s1 leaves memory, its file stays
    assert list(a.sessions.sessions) == ["s2", "s3"]
    assert a.sessions.get("s1").session_id == "s1"  # a miss reads it back; s2 leaves (its KV evicted first)
    assert list(a.sessions.sessions) == ["s3", "s1"] and a.pool.num_used == a.sessions.num_pinned_blocks == 0
    assert len(a.sessions.listing(None, limit=10)[0]) == 3
    turns = conversation(a, "s2", TURNS[1:2])  # back from disk: its KV restored, not recomputed
    assert a.sessions.num_recomputes == 0 and turns
    restarted = make_engine(tiny_checkpoint, session_dir=str(tmp_path), max_sessions=2)
    assert sorted(restarted.sessions.sessions) == ["s2", "s3"]  # the two last saved (a turn, a create)
    a.add_request("busy", a.sessions.get("s1").token_ids + TURNS[2], GREEDY, session_id="s1")
    a.add_request("busy2", a.sessions.get("s2").token_ids + TURNS[2], GREEDY, session_id="s2")
    with pytest.raises(SessionError, match="maximum of 2 sessions") as err:  # every copy held is busy
        a.sessions.create(Session("s4", ttl=600))
    assert err.value.code == "too_many_sessions"


def test_expired_sessions_no_replica_holds_are_swept_from_the_store(replicas, tmp_path):
    import json

    a, b = replicas
    a.sessions.create(Session("gone", ttl=100))
    a.sessions.create(Session("old-format", ttl=100))
    a.sessions.create(Session("locked", ttl=100))
    a.sessions.create(Session("fresh", ttl=10_000))
    conversation(a, "gone", TURNS[:1])
    last = a.sessions.sessions["gone"].last_used
    old = tmp_path / "old-format.session.json"  # as saved before files carried expires_at
    record = json.loads(old.read_text())
    old.write_text(json.dumps({k: v for k, v in record.items() if k != "expires_at"}))
    holder = SessionLocks(tmp_path)
    assert holder.acquire("locked")  # a turn running on some replica
    b.sessions.sessions.clear()  # b holds none of them (like a replica that never read them)
    b.sessions.sweep_interval_s = 0
    assert b.expire_sessions(now=last + 50) == []
    assert sorted(b.expire_sessions(now=last + 150)) == ["gone", "old-format"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.session.json", "locked.lock", "locked.session.json"]
    holder.release("locked")
    assert b.expire_sessions(now=last + 150) == ["locked"]
    with pytest.raises(SessionError, match="does not exist"):
        a.sessions.get("gone")  # a's copy learns the file is gone
    b.sessions.get("fresh")
    b.sessions.sweep_interval_s = 60
    assert b.expire_sessions(now=last + 20_000) == ["fresh"]  # held by b: the in-memory path
    a.sessions.create(Session("later", ttl=1))
    assert b.expire_sessions(now=last + 20_030) == []  # the next sweep is a minute away
