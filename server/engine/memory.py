"""BlockPool: the KV working memory's page allocator.

Every block is exactly one of
  - used:   refcount > 0 (held by sequences or sessions),
  - cached: refcount 0 but still holding a content hash, reusable by a prefix-cache hit,
  - free:   refcount 0 and no hash.
Free and cached blocks share one free list in eviction order: plain free blocks at the
front (taken first), cached blocks appended at the back as they are released, so the
least recently used cached block is evicted first. All operations are O(1) per block.

A full block's hash is SHA-256 over its parent's hash and its own token ids, and the first
block's parent is `root_hash(model identity, cache salt)`: equal hashes mean equal prefixes
computed by the same model (a collision, chance or crafted, is out of reach), the values
are the same in every process (they go to disk with offloaded sessions), and requests with
different cache salts never share a block.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Callable, Iterable, Sequence

NO_PARENT = 0  # the root of tests and tools that need no model identity
HASH_BYTES = 32  # SHA-256


def root_hash(namespace: str, cache_salt: str | None = None) -> int:
    """The parent of a sequence's first block: what the KV depends on besides the tokens
    (`namespace`: model, dtype, quantization) and the request's optional cache salt."""
    data = b"workmem-kv-root\0" + namespace.encode() + b"\0" + (cache_salt or "").encode()
    return int.from_bytes(hashlib.sha256(data).digest(), "big")


def block_hash(parent: int, token_ids: Sequence[int]) -> int:
    """Content hash of a full block: SHA-256 of (parent hash, its token ids)."""
    data = parent.to_bytes(HASH_BYTES, "big") + struct.pack(f"<{len(token_ids)}I", *token_ids)
    return int.from_bytes(hashlib.sha256(data).digest(), "big")


class BlockPool:
    """Preallocated KV blocks with refcounts, an LRU free list and a hash -> block map."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_total = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refcounts = [0] * num_blocks
        self._hashes: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self._free_list: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.num_cached = 0  # blocks on the free list that hold a hash

    # -- accounting -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (plain free + evictable cached)."""
        return len(self._free_list)

    @property
    def num_used(self) -> int:
        return self.num_total - len(self._free_list)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free_list)

    def make_room(self, cost: Callable[[], int], reclaim: Callable[[], bool] | None) -> bool:
        """Whether `cost()` blocks can be allocated, calling `reclaim()` (frees some idle
        memory, e.g. a session's pins; False when nothing is left) until they can. The cost
        is re-evaluated each time: reclaiming can turn held prefix hits into free blocks."""
        while not self.can_allocate(cost()):
            if reclaim is None or not reclaim():
                return False
        return True

    def refcount(self, block: int) -> int:
        """References on `block` (0: on the free list)."""
        return self._refcounts[block]

    def content_hash(self, block: int) -> int | None:
        """The content hash `block` is findable by, None for an anonymous block."""
        return self._hashes[block]

    def eviction_order(self) -> list[int]:
        """The free list, next allocated first (plain free blocks, then cached ones LRU)."""
        return list(self._free_list)

    # -- allocation -------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks off the front of the free list (evicting cached contents)."""
        if n > len(self._free_list):
            raise RuntimeError(f"allocate({n}) with only {len(self._free_list)} free blocks")
        blocks = []
        for _ in range(n):
            block, _ = self._free_list.popitem(last=False)
            self._forget_hash(block)
            self._refcounts[block] = 1
            blocks.append(block)
        return blocks

    def acquire(self, blocks: Iterable[int]) -> None:
        """Add one reference to each block (a prefix-cache hit, a fork, a session pin)."""
        for block in blocks:
            if self._refcounts[block] == 0:
                del self._free_list[block]
                if self._hashes[block] is not None:
                    self.num_cached -= 1
            self._refcounts[block] += 1

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block; at zero it joins the free list.

        Blocks are released tail first, so a sequence's last blocks are evicted before
        its first ones (the prefix is the part most likely to be shared again)."""
        for block in reversed(blocks):
            if self._refcounts[block] <= 0:
                raise RuntimeError(f"free of block {block} with refcount {self._refcounts[block]}")
            self._refcounts[block] -= 1
            if self._refcounts[block] == 0:
                self._free_list[block] = None
                if self._hashes[block] is None:
                    self._free_list.move_to_end(block, last=False)
                else:
                    self.num_cached += 1

    def num_acquirable_free(self, blocks: Iterable[int]) -> int:
        """How many of `blocks` sit on the free list (acquiring them uses free capacity)."""
        return sum(1 for b in blocks if self._refcounts[b] == 0)

    # -- prefix cache -----------------------------------------------------------------
    def register(self, block: int, content_hash: int) -> None:
        """Record that a used, now full block holds the content `content_hash`."""
        if not self.enable_prefix_caching or self._hashes[block] is not None:
            return
        if content_hash in self._hash_to_block:
            return  # another block already holds this content; this one stays anonymous
        self._hashes[block] = content_hash
        self._hash_to_block[content_hash] = block

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """Blocks holding the longest cached prefix of the chain `hashes` (no refs taken)."""
        if not self.enable_prefix_caching:
            return []
        found = []
        for h in hashes:
            block = self._hash_to_block.get(h)
            if block is None:
                break
            found.append(block)
        return found

    # -- checking -------------------------------------------------------------------
    def check_invariants(self, holders: Iterable[Sequence[int]] | None = None) -> None:
        """RuntimeError naming the first broken invariant (tests, debugging; O(blocks)):
        the free list holds exactly the refcount-0 blocks, plain free before cached; the
        counters agree with the blocks; the hash map and the blocks' hashes agree. With
        `holders` (every block table holding references, a block once per reference),
        each block's refcount is the number of references they hold."""
        refs, hashes = self._refcounts, self._hashes
        free = {b for b, r in enumerate(refs) if r == 0}
        cached = sum(1 for b in free if hashes[b] is not None)
        kinds = [hashes[b] is not None for b in self._free_list]
        _require(all(r >= 0 for r in refs), "a refcount is negative")
        _require(set(self._free_list) == free, "the free list is not the set of unreferenced blocks")
        _require(self.num_used == self.num_total - len(free), "num_used disagrees with the refcounts")
        _require(self.num_cached == cached, f"num_cached is {self.num_cached}, {cached} blocks are cached")
        _require(kinds == sorted(kinds), "a cached block sits before a plain free block")
        _require(all(hashes[b] == h for h, b in self._hash_to_block.items()), "hash map and block hashes differ")
        if holders is not None:
            held = [0] * self.num_total
            for table in holders:
                for b in table:
                    held[b] += 1
            _require(held == refs, "refcounts differ from the references the holders hold")

    def _forget_hash(self, block: int) -> None:
        h = self._hashes[block]
        if h is None:
            return
        self._hashes[block] = None
        self.num_cached -= 1
        if self._hash_to_block.get(h) == block:
            del self._hash_to_block[h]


def _require(ok: bool, broken: str) -> None:
    if not ok:
        raise RuntimeError(f"BlockPool invariant broken: {broken}")
