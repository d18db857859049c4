"""BlockPool: exact block ids in small hand cases, and a hypothesis state machine that
checks the accounting invariants under random allocate/fork/free/register/hit/abort."""
from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from server.engine.memory import NO_PARENT, BlockPool, block_hash


def check_pool(pool: BlockPool) -> None:
    pool.check_invariants()
    assert pool.num_free + pool.num_used == pool.num_total


def refcounts(pool: BlockPool) -> list[int]:
    return [pool.refcount(b) for b in range(pool.num_total)]


# -- hand cases ----------------------------------------------------------------------
def test_fresh_pool_allocates_in_id_order_and_validates():
    pool = BlockPool(6, 4)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert refcounts(pool) == [1, 1, 1, 1, 1, 0]
    assert pool.can_allocate(1) and not pool.can_allocate(2)
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    assert pool.num_used == 5  # a failed allocate takes nothing
    with pytest.raises(ValueError):
        BlockPool(0, 4)
    with pytest.raises(ValueError):
        BlockPool(4, 0)
    check_pool(pool)


def test_free_of_unreferenced_block_raises():
    pool = BlockPool(3, 4)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError):
        pool.free([b])
    check_pool(pool)


def test_plain_free_blocks_are_reused_first_in_table_order():
    pool = BlockPool(6, 4)
    table = pool.allocate(3)  # [0, 1, 2]
    pool.free(table)
    # Plain (unhashed) blocks go to the front; the released table is reused in order.
    assert pool.eviction_order() == [0, 1, 2, 3, 4, 5]
    assert pool.allocate(4) == [0, 1, 2, 3]
    check_pool(pool)


def test_free_releases_tail_first_so_last_blocks_are_evicted_first():
    pool = BlockPool(6, 4)
    table = pool.allocate(3)
    for i, b in enumerate(table):
        pool.register(b, 100 + i)
    pool.free(table)
    assert pool.num_cached == 3
    assert pool.eviction_order() == [3, 4, 5, 2, 1, 0]
    # Plain blocks 3, 4, 5 first, then the table's tail block 2 is evicted before 1 and 0.
    assert pool.allocate(4) == [3, 4, 5, 2]
    assert pool.content_hash(2) is None and pool.lookup([102]) == []
    assert pool.lookup([100, 101, 102]) == [0, 1]
    check_pool(pool)


def test_cached_block_is_found_and_reacquired_with_same_id():
    pool = BlockPool(4, 4)
    a, b = pool.allocate(2)
    pool.register(a, 7)
    pool.register(b, 8)
    pool.free([a, b])
    assert (pool.num_used, pool.num_cached) == (0, 2)
    hits = pool.lookup([7, 8])
    assert hits == [a, b]
    assert pool.num_acquirable_free(hits) == 2
    pool.acquire(hits)
    assert pool.refcount(a) == pool.refcount(b) == 1
    assert (pool.num_used, pool.num_cached) == (2, 0)
    assert pool.content_hash(a) == 7 and pool.lookup([8]) == [b]  # content kept
    assert pool.num_acquirable_free(hits) == 0
    # A second holder shares them; they only go back to the cache at the last free.
    pool.acquire(hits)
    pool.free(hits)
    assert pool.refcount(a) == 1 and a not in pool.eviction_order()
    pool.free(hits)
    assert pool.num_cached == 2 and pool.lookup([7]) == [a]
    check_pool(pool)


def test_plain_free_blocks_are_handed_out_before_cached_ones():
    pool = BlockPool(5, 4)
    t1 = pool.allocate(2)  # [0, 1]
    t2 = pool.allocate(2)  # [2, 3]
    pool.register(t1[0], 11)
    pool.free(t1)  # 0 cached, 1 plain
    pool.free(t2)  # both plain
    assert pool.num_cached == 1
    assert pool.allocate(4) == [2, 3, 1, 4]
    assert pool.lookup([11]) == [0]  # cached block survived while plain ones existed
    assert pool.allocate(1) == [0]
    assert pool.lookup([11]) == [] and pool.num_cached == 0
    check_pool(pool)


def test_eviction_is_lru_over_cached_blocks():
    pool = BlockPool(4, 4)
    blocks = pool.allocate(4)
    for b in blocks:
        pool.register(b, 50 + b)
    for b in (2, 0, 3, 1):  # release order = recency order
        pool.free([b])
    # Touch block 0 again (a cache hit) and release it: it becomes most recent.
    pool.acquire(pool.lookup([50]))
    pool.free([0])
    assert pool.eviction_order() == [2, 3, 1, 0]
    assert pool.allocate(1) == [2]
    assert pool.allocate(1) == [3]
    assert pool.lookup([51]) == [1] and pool.lookup([50]) == [0]
    assert pool.lookup([52]) == [] and pool.lookup([53]) == []
    check_pool(pool)


def test_register_duplicate_hash_leaves_second_block_anonymous():
    pool = BlockPool(4, 4)
    a, b = pool.allocate(2)
    pool.register(a, 99)
    pool.register(b, 99)
    assert pool.content_hash(a) == 99 and pool.content_hash(b) is None
    assert pool.lookup([99]) == [a]
    pool.register(a, 123)  # a block's content never changes while it is held
    assert pool.content_hash(a) == 99 and pool.lookup([123]) == []
    pool.free([a, b])
    assert pool.num_cached == 1
    assert pool.eviction_order()[0] == b  # anonymous block went to the front as plain free
    check_pool(pool)


def test_evicting_holder_of_hash_lets_another_block_register_it():
    pool = BlockPool(2, 4)
    (a,) = pool.allocate(1)
    pool.register(a, 5)
    pool.free([a])
    (b,) = pool.allocate(1)  # plain block 1 first; a keeps its content
    assert b == 1 and pool.lookup([5]) == [a]
    (c,) = pool.allocate(1)  # evicts a
    assert c == a and pool.lookup([5]) == []
    pool.register(b, 5)
    assert pool.lookup([5]) == [b]
    check_pool(pool)


def test_lookup_returns_longest_prefix_and_stops_at_first_miss():
    pool = BlockPool(8, 4)
    table = pool.allocate(4)
    chain = []
    parent = NO_PARENT
    for i, b in enumerate(table):
        parent = block_hash(parent, [i] * 4)
        chain.append(parent)
    for b, h in zip(table[:2], chain[:2]):
        pool.register(b, h)
    pool.register(table[3], chain[3])  # block 2 missing: a hole in the chain
    assert pool.lookup(chain) == table[:2]
    assert pool.lookup(chain[:1]) == table[:1]
    assert pool.lookup([]) == []
    assert pool.lookup([12345] + chain) == []
    # lookup takes no references
    assert pool.refcount(table[0]) == 1
    check_pool(pool)


def test_block_hash_covers_parent_and_tokens():
    h1 = block_hash(NO_PARENT, [1, 2, 3, 4])
    assert h1 == block_hash(NO_PARENT, (1, 2, 3, 4))
    assert h1 != block_hash(NO_PARENT, [1, 2, 3, 5])
    assert block_hash(h1, [5, 6, 7, 8]) != block_hash(NO_PARENT, [5, 6, 7, 8])


def test_prefix_caching_disabled_never_caches():
    pool = BlockPool(4, 4, enable_prefix_caching=False)
    table = pool.allocate(3)
    for i, b in enumerate(table):
        pool.register(b, 200 + i)
    assert [pool.content_hash(b) for b in range(4)] == [None] * 4
    assert pool.lookup([200, 201]) == []
    pool.free(table)
    assert pool.num_cached == 0 and pool.num_free == 4
    assert pool.allocate(4) == [0, 1, 2, 3]
    check_pool(pool)


# -- property test --------------------------------------------------------------------
class PoolMachine(RuleBasedStateMachine):
    """Holders are lists of block ids the test owns (sequences, forks, session pins).
    The model predicts refcounts, the cached set and the LRU eviction order."""

    NUM_BLOCKS = 12
    PREFIX_CACHING = True

    holders = Bundle("holders")

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(self.NUM_BLOCKS, 4, self.PREFIX_CACHING)
        self.held: dict[int, list[int]] = {}
        self.next_holder = 0
        self.lru: list[int] = []  # cached-free blocks, least recently released first
        self.registered: list[int] = []  # hashes ever registered (lookup candidates)

    # -- helpers ---------------------------------------------------------------------
    def _new_holder(self, blocks: list[int]) -> int:
        hid = self.next_holder
        self.next_holder += 1
        self.held[hid] = blocks
        return hid

    def _model_refcount(self, block: int) -> int:
        return sum(blocks.count(block) for blocks in self.held.values())

    def _release(self, blocks: list[int]) -> None:
        """Free through the pool and update the model's LRU order (tail first)."""
        self.pool.free(blocks)
        for b in reversed(blocks):
            if self._model_refcount(b) == 0 and self.pool.content_hash(b) is not None:
                self.lru.append(b)

    def _acquire(self, blocks: list[int]) -> None:
        for b in blocks:
            if b in self.lru:
                self.lru.remove(b)
        self.pool.acquire(blocks)

    # -- rules -----------------------------------------------------------------------
    @rule(target=holders, n=st.integers(0, 5))
    def allocate(self, n):
        plain = [b for b in self.pool.eviction_order() if self.pool.content_hash(b) is None]
        if n > self.pool.num_free:
            with pytest.raises(RuntimeError):
                self.pool.allocate(n)
            return self._new_holder([])
        got = self.pool.allocate(n)
        k = min(n, len(plain))
        assert set(got[:k]) <= set(plain)  # plain free blocks first ...
        assert got[k:] == self.lru[: n - k]  # ... then cached ones in LRU order
        self.lru = self.lru[n - k :]
        for b in got:
            assert self.pool.content_hash(b) is None and self.pool.refcount(b) == 1
        return self._new_holder(got)

    @rule(target=holders, src=holders, data=st.data())
    def fork(self, src, data):
        blocks = self.held.get(src, [])
        shared = data.draw(st.lists(st.sampled_from(blocks), unique=True)) if blocks else []
        self._acquire(shared)
        return self._new_holder(shared)

    @rule(holder=holders, data=st.data())
    def free_some(self, holder, data):
        blocks = self.held.get(holder, [])
        k = data.draw(st.integers(0, len(blocks)))
        tail, self.held[holder] = blocks[k:], blocks[:k]  # a holder frees its tail (truncate)
        self._release(tail)

    @rule(holder=consumes(holders))
    def abort(self, holder):
        blocks = self.held.pop(holder, [])
        self._release(blocks)

    @rule(holder=holders, data=st.data())
    def register(self, holder, data):
        blocks = self.held.get(holder, [])
        if not blocks:
            return
        b = data.draw(st.sampled_from(blocks))
        h = data.draw(st.integers(1, 40))
        before = self.pool.content_hash(b)
        owner = next(iter(self.pool.lookup([h])), None)
        self.pool.register(b, h)
        if not self.PREFIX_CACHING:
            assert self.pool.content_hash(b) is None
        elif before is not None:
            assert self.pool.content_hash(b) == before
        elif owner is not None and owner != b:
            assert self.pool.content_hash(b) is None and self.pool.lookup([h]) == [owner]
        else:
            assert self.pool.content_hash(b) == h and self.pool.lookup([h]) == [b]
        self.registered.append(h)

    @rule(target=holders, data=st.data())
    def cache_hit(self, data):
        """Like the scheduler's admission: look up a chain, check capacity, acquire hits."""
        pool_ = st.sampled_from(self.registered) if self.registered else st.integers(1, 40)
        chain = data.draw(st.lists(st.one_of(pool_, st.integers(1, 40)), max_size=4, unique=True))
        hits = self.pool.lookup(chain)
        expect = []
        for h in chain:
            found = self.pool.lookup([h])  # one link alone
            if not found:
                break
            expect += found
        assert hits == (expect if self.PREFIX_CACHING else [])
        extra = data.draw(st.integers(0, 2))
        if not self.pool.can_allocate(extra + self.pool.num_acquirable_free(hits)):
            return self._new_holder([])
        free_before, taken = self.pool.num_free, self.pool.num_acquirable_free(hits)
        self._acquire(hits)
        assert self.pool.num_free == free_before - taken
        got = self.pool.allocate(extra)
        for b in got:
            if b in self.lru:
                self.lru.remove(b)
        return self._new_holder(hits + got)

    # -- invariants ------------------------------------------------------------------
    @invariant()
    def accounting(self):
        self.pool.check_invariants(self.held.values())

    @invariant()
    def refcounts_match_model(self):
        for b in range(self.NUM_BLOCKS):
            assert self.pool.refcount(b) == self._model_refcount(b), b

    @invariant()
    def lru_matches_model(self):
        cached = [b for b in self.pool.eviction_order() if self.pool.content_hash(b) is not None]
        assert cached == self.lru

    def teardown(self):
        for hid in list(self.held):
            self._release(self.held.pop(hid))
        check_pool(self.pool)
        assert self.pool.num_used == 0
        assert self.pool.num_free == self.NUM_BLOCKS
        assert not any(refcounts(self.pool))


class PoolMachineNoPrefixCache(PoolMachine):
    PREFIX_CACHING = False


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestPoolMachineNoPrefixCache = PoolMachineNoPrefixCache.TestCase
TestPoolMachineNoPrefixCache.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_check_invariants_names_references_nobody_holds():
    pool = BlockPool(4, 4)
    a, b = pool.allocate(2)
    pool.acquire([a])
    pool.check_invariants([[a, b], [a]])
    with pytest.raises(RuntimeError, match="refcounts differ"):
        pool.check_invariants([[a, b]])  # a second reference on `a` that no holder owns: a leak
