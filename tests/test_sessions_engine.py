"""Sessions at the engine level: resident KV between turns, identical tokens, fork
sharing, eviction to the dropped tier, aborted turns, TTL."""
from __future__ import annotations

import pytest
import torch

from model.sampling import SamplingParams
from server.engine import EngineConfig, LLMEngine
from server.engine.sessions import Session, SessionError

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
BS = 4


@pytest.fixture
def engine(tiny_checkpoint):
    config = EngineConfig(model=str(tiny_checkpoint("llama")), dtype="float32", device="cpu",
                          block_size=BS, num_kv_blocks=64, max_model_len=128)
    return LLMEngine(config)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: LLMEngine, request_id: str, prompt: list[int], session_id: str | None = None):
    engine.add_request(request_id, prompt, GREEDY, session_id=session_id, new_messages=[{"role": "user", "content": request_id}])
    tokens, cached = [], None
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            cached = out.num_cached_tokens
    return tokens, cached


def reference(tiny_checkpoint, prompt: list[int]) -> list[int]:
    fresh = LLMEngine(EngineConfig(model=str(tiny_checkpoint("llama")), dtype="float32", device="cpu",
                                   block_size=BS, num_kv_blocks=64, max_model_len=128, enable_prefix_caching=False))
    return run(fresh, "ref", prompt)[0]


def test_turns_reuse_resident_kv_and_match_a_fresh_engine(engine, tiny_checkpoint):
    engine.sessions.create(Session("s", ttl=60))
    turn1 = ids(10, 1)
    out1, cached1 = run(engine, "t1", turn1, "s")
    session = engine.sessions.get("s")
    assert session.token_ids == turn1 + out1 and session.num_turns == 1
    computed = len(turn1) + len(out1) - 1  # the last reply token has no KV yet
    assert session.num_kv_tokens == computed and len(session.block_table) == -(-computed // BS)
    assert all(engine.pool.refcount(b) == 1 for b in session.block_table)
    turn2 = session.token_ids + ids(7, 2)
    out2, cached2 = run(engine, "t2", turn2, "s")
    assert cached1 == 0
    assert cached2 == 15  # every computed token of turn 1, the partial block included: only new tokens prefilled
    assert out2 == reference(tiny_checkpoint, turn2)
    assert session.messages[-1]["role"] == "assistant" and len(session.messages) == 4
    assert engine.pool.num_used == len(session.block_table)


def test_fork_shares_blocks_and_branches_diverge(engine, tiny_checkpoint):
    engine.sessions.create(Session("a", ttl=60))
    run(engine, "t1", ids(13, 3), "a")
    a = engine.sessions.get("a")
    b = engine.sessions.fork("a", "b", ttl=60)
    assert b.block_table == a.block_table and all(engine.pool.refcount(x) == 2 for x in a.block_table)
    shared_tokens = b.num_kv_tokens
    out_a, _ = run(engine, "ta", a.token_ids + ids(5, 4), "a")
    out_b, cached_b = run(engine, "tb", b.token_ids + ids(5, 5), "b")
    assert cached_b == shared_tokens  # the fork's turn prefilled only its new tokens
    assert out_b == reference(tiny_checkpoint, b.token_ids[: -len(out_b)])
    assert a.token_ids != b.token_ids
    full = shared_tokens // BS
    assert a.block_table[:full] == b.block_table[:full]  # the common full blocks are still shared
    assert a.block_table[full] != b.block_table[full]  # each branch copied the partial block on write


def test_aborted_turn_leaves_session_unchanged(engine):
    engine.sessions.create(Session("s", ttl=60))
    run(engine, "t1", ids(9, 6), "s")
    s = engine.sessions.get("s")
    before = (list(s.token_ids), list(s.block_table), list(s.messages), s.num_turns)
    engine.add_request("t2", s.token_ids + ids(5, 7), SamplingParams(max_tokens=50, ignore_eos=True), session_id="s")
    with pytest.raises(SessionError, match="already has a turn running"):
        engine.add_request("t3", s.token_ids + [1], GREEDY, session_id="s")
    engine.step()
    engine.step()
    engine.abort("t2")
    assert (s.token_ids, s.block_table, s.messages, s.num_turns) == before and not s.busy
    assert engine.pool.num_used == len(s.block_table)


def test_idle_sessions_are_dropped_for_running_requests_and_recompute_identically(engine, tiny_checkpoint):
    for k in range(6):
        engine.sessions.create(Session(f"s{k}", ttl=60))
        run(engine, f"t{k}", ids(30, 10 + k), f"s{k}")
    pinned = engine.sessions.num_pinned_blocks
    assert pinned <= engine.sessions.max_pinned_blocks
    # A long request needs most of the pool: idle sessions are dropped, nobody is preempted.
    run(engine, "big", ids(120, 99))
    assert engine.sessions.num_evictions > 0 and engine.scheduler.num_preemptions == 0
    dropped = [s for s in engine.sessions.sessions.values() if s.tier == "dropped"]
    assert dropped
    s = dropped[0]
    turn = s.token_ids + ids(4, 50)
    out, _ = run(engine, "again", turn, s.session_id)
    assert out == reference(tiny_checkpoint, turn)
    assert s.tier == "resident"


def test_ttl_expiry_and_limits(engine):
    engine.sessions.create(Session("old", ttl=1))
    run(engine, "t", ids(9, 8), "old")
    assert engine.expire_sessions(now=engine.sessions.get("old").last_used + 2) == ["old"]
    assert engine.pool.num_used == 0
    with pytest.raises(SessionError, match="does not exist"):
        engine.add_request("x", [1, 2], GREEDY, session_id="old")
    engine.sessions.max_sessions = 1
    engine.sessions.create(Session("one", ttl=60))
    with pytest.raises(SessionError, match="maximum of 1 sessions"):
        engine.sessions.create(Session("two", ttl=60))


def make_engine(tiny_checkpoint, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_checkpoint("llama")), dtype="float32", device="cpu",
                                  block_size=BS, num_kv_blocks=64, max_model_len=128, **kw))


def conversation(engine: LLMEngine, sid: str, turns: list[list[int]]) -> list[list[int]]:
    outs = []
    for i, new in enumerate(turns):
        prompt = engine.sessions.get(sid).token_ids + new
        outs.append(run(engine, f"{sid}-{i}-{id(engine)}", prompt, sid)[0])
    return outs


def test_restart_with_session_dir_continues_identically(tiny_checkpoint, tmp_path):
    turns = [ids(9, 20), ids(6, 21), ids(7, 22)]
    never_restarted = make_engine(tiny_checkpoint)
    never_restarted.sessions.create(Session("s", ttl=600))
    expected = conversation(never_restarted, "s", turns)

    first = make_engine(tiny_checkpoint, session_dir=str(tmp_path))
    first.sessions.create(Session("s", ttl=600))
    assert conversation(first, "s", turns[:2]) == expected[:2]
    del first  # no shutdown hook runs: like kill -9 after the second turn's response
    second = make_engine(tiny_checkpoint, session_dir=str(tmp_path))
    restored = second.sessions.get("s")
    assert restored.num_turns == 2 and restored.tier == "dropped" and len(restored.messages) == 4
    assert conversation(second, "s", turns[2:]) == expected[2:]
    assert second.sessions.num_recomputes == 1
    third = make_engine(tiny_checkpoint, session_dir=str(tmp_path))
    assert third.sessions.get("s").num_turns == 3


def test_corrupt_session_file_fails_only_that_session(tiny_checkpoint, tmp_path):
    engine = make_engine(tiny_checkpoint, session_dir=str(tmp_path))
    for sid in ("good", "bad", "stale"):
        engine.sessions.create(Session(sid, ttl=600))
        conversation(engine, sid, [ids(5, 30)])
    bad = tmp_path / "bad.session.json"
    bad.write_text(bad.read_text().replace('"num_turns', '"num_turnz'))  # payload edited: checksum fails
    stale = tmp_path / "stale.session.json"
    stale.write_text(stale.read_text().replace('"format_version": 1', '"format_version": 99'))
    (tmp_path / "junk.session.json").write_text("{not json")
    reloaded = make_engine(tiny_checkpoint, session_dir=str(tmp_path))
    assert reloaded.sessions.get("good").num_turns == 1
    for sid, why in (("bad", "checksum"), ("stale", "format version"), ("junk", "unreadable")):
        with pytest.raises(SessionError, match=why) as err:
            reloaded.add_request("x", [1, 2, 3], GREEDY, session_id=sid)
        assert err.value.code == "session_corrupt"
    reloaded.sessions.delete("bad")
    assert not bad.exists()
    conversation(reloaded, "good", [ids(4, 31)])  # the others keep working


def test_offload_to_disk_and_restore_give_identical_tokens(tiny_checkpoint, tmp_path):
    turns = [ids(20, 40), ids(6, 41)]
    plain = make_engine(tiny_checkpoint)
    plain.sessions.create(Session("s", ttl=600))
    expected = conversation(plain, "s", turns)

    engine = make_engine(tiny_checkpoint, session_dir=str(tmp_path))
    engine.sessions.create(Session("s", ttl=600))
    conversation(engine, "s", turns[:1])
    s = engine.sessions.get("s")
    assert engine.sessions.reclaim() and s.tier == "offloaded" and engine.sessions.num_offloads == 1
    assert (tmp_path / "s.kv.pt").exists()
    for k in range(3):  # fill the pool so the session's freed blocks are evicted and reused
        engine.add_request(f"flush{k}", ids(100, 42 + k), GREEDY)
    while engine.has_unfinished():
        engine.step()
    out = conversation(engine, "s", turns[1:])
    assert out == expected[1:]
    assert engine.sessions.num_disk_restores == 1 and engine.sessions.num_recomputes == 0
    assert not (tmp_path / "s.kv.pt").exists()


def test_graceful_shutdown_saves_kv_and_restart_restores_it(tiny_checkpoint, tmp_path):
    turns = [ids(20, 50), ids(6, 51)]
    plain = make_engine(tiny_checkpoint)
    plain.sessions.create(Session("s", ttl=600))
    expected = conversation(plain, "s", turns)
    first = make_engine(tiny_checkpoint, session_dir=str(tmp_path))
    first.sessions.create(Session("s", ttl=600))
    conversation(first, "s", turns[:1])
    assert first.sessions.save_all() == 1
    second = make_engine(tiny_checkpoint, session_dir=str(tmp_path))
    assert second.sessions.get("s").tier == "offloaded"
    assert conversation(second, "s", turns[1:]) == expected[1:]
    assert second.sessions.num_disk_restores == 1  # a new engine's pool holds nothing
    # A corrupt KV file only costs a recompute.
    second.sessions.save_all()
    (tmp_path / "s.kv.pt").write_bytes(b"not a tensor file")
    third = make_engine(tiny_checkpoint, session_dir=str(tmp_path))
    out = conversation(third, "s", [ids(3, 52)])
    assert third.sessions.num_recomputes == 1 and third.sessions.num_disk_restores == 0 and out


def batch(engine: LLMEngine, prompts: dict[str, tuple[list[int], str | None]]) -> dict[str, list[int]]:
    """Run requests concurrently: {request_id: (prompt, session_id)} -> tokens."""
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    for rid, (prompt, sid) in prompts.items():
        engine.add_request(rid, prompt, GREEDY, session_id=sid)
    while engine.has_unfinished():
        for step in engine.step():
            out[step.request_id] += step.new_token_ids
    return out


@pytest.mark.parametrize("with_disk", [False, True])
def test_fifty_sessions_on_a_small_pool_all_continue_correctly(tiny_checkpoint, tmp_path, with_disk):
    engine = make_engine(tiny_checkpoint, session_dir=str(tmp_path) if with_disk else None)
    names = [f"s{i}" for i in range(50)]
    for name in names:
        engine.sessions.create(Session(name, ttl=600))
    for wave in range(0, 50, 10):  # ten sessions' first turns at a time
        batch(engine, {f"{n}-1": (ids(12, i), n) for i, n in enumerate(names[wave:wave + 10], start=wave)})
    tiers = [engine.sessions.get(n).tier for n in names]
    assert tiers.count("resident") < 50  # the pool (64 blocks, half for idle sessions) cannot keep all
    assert ("offloaded" in tiers) == with_disk and ("dropped" in tiers) != with_disk
    prompts = {n: engine.sessions.get(n).token_ids + ids(5, 100 + i) for i, n in enumerate(names)}
    second = {}
    for wave in range(0, 50, 10):
        second.update(batch(engine, {f"{n}-2": (prompts[n], n) for n in names[wave:wave + 10]}))
    reference = batch(make_engine(tiny_checkpoint, enable_prefix_caching=False),
                      {f"{n}-2": (prompts[n], None) for n in names})
    assert second == reference
    assert all(engine.sessions.get(n).num_turns == 2 for n in names)
    assert engine.pool.num_used == engine.sessions.num_pinned_blocks
    assert engine.sessions.num_evictions > 0
    if with_disk:
        assert engine.sessions.num_offloads > 0 and engine.sessions.num_disk_restores > 0


def test_host_memory_offload_tier_restores_identically(tiny_checkpoint):
    """The CUDA tier (host memory), exercised on the CPU by installing it by hand."""
    from server.engine.sessions.offload import HostKVSwapper

    turns = [ids(20, 60), ids(6, 61)]
    plain = make_engine(tiny_checkpoint)
    plain.sessions.create(Session("s", ttl=600))
    expected = conversation(plain, "s", turns)
    engine = make_engine(tiny_checkpoint)
    assert engine.sessions.swapper is None  # CPU without --session-dir: evicted sessions are dropped
    engine.sessions.swapper = HostKVSwapper(engine.runner.kv_cache)
    engine.sessions.create(Session("s", ttl=600))
    conversation(engine, "s", turns[:1])
    assert engine.sessions.reclaim() and engine.sessions.get("s").tier == "offloaded"
    for k in range(3):  # evict the freed blocks from the pool
        engine.add_request(f"flush{k}", ids(100, 62 + k), GREEDY)
    while engine.has_unfinished():
        engine.step()
    assert conversation(engine, "s", turns[1:]) == expected[1:]
    assert engine.sessions.num_memory_restores == 1 and engine.sessions.num_recomputes == 0
    assert engine.sessions.swapper.saved == {}


STEP_BOUND = 500  # far more steps than the two turns need: reaching it means the engine is stuck


def test_turns_whose_sessions_pin_the_pool_between_them_still_run(tiny_checkpoint, tmp_path):
    """Two sessions' next turns queued at once, one's KV restored from disk as its turn
    began: their pins leave fewer free blocks than either turn needs, and neither session is
    idle (the soak's 120 s hangs). The queued turns give up their pins (the last queued
    first) and run, with the tokens a fresh engine gives."""
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint("llama")), dtype="float32", device="cpu",
                                    block_size=BS, num_kv_blocks=16, max_model_len=64, session_dir=str(tmp_path)))
    for sid, seed in (("a", 80), ("b", 81)):
        engine.sessions.create(Session(sid, ttl=600))
        conversation(engine, sid, [ids(22, seed)])
    assert engine.sessions.get("a").tier == "offloaded"  # the pin budget (half the pool) kept b only
    prompts = {sid: engine.sessions.get(sid).token_ids + ids(8, seed) for sid, seed in (("a", 82), ("b", 83))}
    for sid, prompt in prompts.items():
        engine.add_request(sid, prompt, GREEDY, session_id=sid)
    needed = -(-len(prompts["a"]) // BS) - len(engine.sessions.get("a").block_table) + 1  # + the tail's copy
    assert engine.pool.num_free < needed and engine.sessions.reclaim() is False  # the stall, as it was
    out: dict[str, list[int]] = {sid: [] for sid in prompts}
    for _ in range(STEP_BOUND):
        if not engine.has_unfinished():
            break
        for step in engine.step():
            out[step.request_id] += step.new_token_ids
    assert not engine.has_unfinished(), f"stuck: {engine.pool.num_free} blocks free"
    assert out == {sid: reference(tiny_checkpoint, prompt) for sid, prompt in prompts.items()}
    assert all(engine.sessions.get(sid).num_turns == 2 for sid in prompts)
    assert engine.pool.num_used == engine.sessions.num_pinned_blocks


def _raise(*_args, **_kwargs):
    raise RuntimeError("injected fault")


@pytest.mark.parametrize("where", ["scheduler.add", "text stream", "KV restore"])
def test_a_turn_that_fails_inside_add_request_gives_the_session_back(tiny_checkpoint, tmp_path, monkeypatch, where):
    """A failure after begin_turn (queueing the sequence, its detokenizer, reading its
    offloaded KV back) leaves the session idle and unlocked, its blocks accounted for: the
    next turn runs and gives the tokens a fresh engine gives."""
    engine = make_engine(tiny_checkpoint, session_dir=str(tmp_path))
    engine.sessions.create(Session("s", ttl=600))
    conversation(engine, "s", [ids(9, 60)])
    session = engine.sessions.get("s")
    used_before = engine.pool.num_used
    with monkeypatch.context() as patch:
        if where == "scheduler.add":
            patch.setattr(engine.scheduler, "add", _raise)
        elif where == "text stream":
            patch.setattr("server.engine.engine.TextStream", _raise)
        else:
            assert engine.sessions.reclaim() and session.tier == "offloaded"
            patch.setattr(engine.sessions.swapper, "write_blocks", _raise)
            used_before = engine.pool.num_used
        with pytest.raises(RuntimeError, match="injected fault"):
            engine.add_request("t", session.token_ids + ids(4, 61), GREEDY, session_id="s")
    assert not session.busy and not engine.has_request("t") and not engine.has_unfinished()
    assert engine.sessions.disk.store.locks.held == {}  # the file lock went back too
    assert engine.pool.num_used == used_before
    new = ids(5, 62)
    expected = reference(tiny_checkpoint, session.token_ids + new)
    assert conversation(engine, "s", [new]) == [expected]


def test_ownership_without_exceptions(tiny_checkpoint, tmp_path):
    """A corrupt file still says whose it is (the owner sits ahead of the payload): other keys
    get 'not found' for it and cannot delete it. A session made without keys belongs to no
    key once keys are set (only a server without keys, caller None, sees it). A file too
    damaged to name its owner is deletable only without keys."""
    engine = make_engine(tiny_checkpoint, session_dir=str(tmp_path))
    engine.sessions.create(Session("mine", ttl=600, owner="key_a"))
    engine.sessions.create(Session("anon", ttl=600))
    conversation(engine, "mine", [ids(5, 70)])
    mine = tmp_path / "mine.session.json"
    mine.write_text(mine.read_text().replace('"num_turns', '"num_turnz'))  # payload damaged: checksum fails
    (tmp_path / "junk.session.json").write_text("{not json")
    reloaded = make_engine(tiny_checkpoint, session_dir=str(tmp_path))
    tables = reloaded.sessions
    for op in (tables.get, tables.delete):
        with pytest.raises(SessionError) as err:
            op("mine", "key_b")
        assert err.value.code == "session_not_found"
    assert mine.exists()
    with pytest.raises(SessionError) as err:
        tables.get("mine", "key_a")
    assert err.value.code == "session_corrupt"
    tables.delete("mine", "key_a")
    assert not mine.exists()
    with pytest.raises(SessionError, match="does not exist"):
        tables.get("anon", "key_a")
    assert tables.get("anon").session_id == "anon"
    assert [s["id"] for s in tables.listing("key_a", 10)[0]] == []
    assert sorted(s["id"] for s in tables.listing(None, 10)[0]) == ["anon"]
    with pytest.raises(SessionError, match="does not exist"):
        tables.delete("junk", "key_a")
    tables.delete("junk")
    assert not (tmp_path / "junk.session.json").exists()
