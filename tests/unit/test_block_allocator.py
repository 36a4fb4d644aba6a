"""Tests of the C++ paged-KV block allocator (`blip3o_engine._C.BlockAllocator`).

Unit tests pin each API and error path; a hypothesis state machine drives random operation
sequences against a small pure-Python model of the documented behaviour (LIFO free list, LRU of
evictable cached blocks, first-registered-wins hash map) and checks the two agree after each step.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import blip3o_engine
from blip3o_engine.native import BlockAllocator, InvariantError, OutOfBlocksError

MASK64 = (1 << 64) - 1


def reference_hash(parent_hash: int, token_ids: list[int], extra: int = 0) -> int:
    """The documented hash, written out in Python: FNV-1a 64 over 8 little-endian bytes of each of
    parent_hash, extra, the tokens (as int64) and the token count, then MurmurHash3 fmix64."""
    h = 0xCBF29CE484222325

    def feed(word: int) -> None:
        nonlocal h
        for i in range(8):
            h ^= (word >> (8 * i)) & 0xFF
            h = (h * 0x100000001B3) & MASK64

    feed(parent_hash & MASK64)
    feed(extra & MASK64)
    for t in token_ids:
        feed(t & MASK64)  # two's complement, i.e. sign-extended int64
    feed(len(token_ids))
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & MASK64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & MASK64
    h ^= h >> 33
    return h


# ------------------------------------------------------------------------------------------------
# Construction and plain allocation


def test_construction_and_properties():
    a = BlockAllocator(5, 16)
    assert (a.num_blocks, a.block_size, a.enable_prefix_caching) == (5, 16, True)
    assert (a.num_free_blocks, a.num_evictable_blocks, a.num_cached_blocks) == (5, 0, 0)
    assert [a.ref_count(b) for b in range(5)] == [0] * 5
    assert BlockAllocator(3, 4, enable_prefix_caching=False).enable_prefix_caching is False
    assert "num_blocks=5" in repr(a)
    a.check_invariants()


@pytest.mark.parametrize("num_blocks, block_size", [(0, 16), (-1, 16), (4, 0), (4, -2), (2**31, 16)])
def test_construction_rejects_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockAllocator(num_blocks, block_size)


def test_allocate_hands_out_every_block_then_raises():
    a = BlockAllocator(3, 4)
    assert [a.allocate() for _ in range(3)] == [0, 1, 2]  # a fresh pool is handed out in order
    assert a.num_free_blocks == 0
    assert [a.ref_count(b) for b in range(3)] == [1, 1, 1]
    with pytest.raises(OutOfBlocksError, match="all 3 blocks are in use"):
        a.allocate()
    assert issubclass(OutOfBlocksError, RuntimeError)
    a.check_invariants()


def test_free_list_is_lifo():
    a = BlockAllocator(4, 4)
    blocks = [a.allocate() for _ in range(4)]
    a.free(blocks[1])
    a.free(blocks[3])
    assert a.allocate() == blocks[3]  # the most recently freed block comes back first
    assert a.allocate() == blocks[1]


def test_free_and_incref_count_references():
    a = BlockAllocator(2, 4)
    b = a.allocate()
    a.incref(b)
    a.incref(b)
    assert a.ref_count(b) == 3
    a.free(b)
    a.free(b)
    assert a.ref_count(b) == 1 and a.num_free_blocks == 1
    a.free(b)
    assert a.ref_count(b) == 0 and a.num_free_blocks == 2
    a.check_invariants()


def test_free_of_unreferenced_block_raises_value_error():
    a = BlockAllocator(2, 4)
    with pytest.raises(ValueError, match="already 0"):
        a.free(0)  # never allocated
    b = a.allocate()
    a.free(b)
    with pytest.raises(ValueError):
        a.free(b)  # double free
    a.check_invariants()


def test_incref_of_unreferenced_block_raises_value_error():
    a = BlockAllocator(2, 4)
    with pytest.raises(ValueError, match="not in use"):
        a.incref(1)


@pytest.mark.parametrize("bad_id", [-1, 3, 2**31 - 1])
def test_out_of_range_block_ids_raise_index_error(bad_id):
    a = BlockAllocator(3, 4)
    a.allocate()
    for call in (a.free, a.incref, a.ref_count, lambda b: a.register(b, 7)):
        with pytest.raises(IndexError):
            call(bad_id)
    a.check_invariants()


def test_block_ids_accept_numpy_integers():
    a = BlockAllocator(3, 4)
    b = a.allocate()
    a.incref(np.int64(b))
    a.free(np.int32(b))
    assert a.ref_count(np.int64(b)) == 1


# ------------------------------------------------------------------------------------------------
# Hashing


def test_hash_matches_documented_definition():
    cases = [(0, [], 0), (0, [1, 2, 3], 0), (12345, list(range(16)), 0), (7, [151643, 0, 42], 99),
             (2**64 - 1, [-1, 2**31 - 1, -(2**31)], 2**63), (3, [2**40, -(2**62)], 5)]
    for parent, tokens, extra in cases:
        assert BlockAllocator.hash_block(parent, tokens, extra) == reference_hash(parent, tokens, extra)


def test_hash_is_64_bit_and_sensitive_to_every_input():
    base = BlockAllocator.hash_block(11, [1, 2, 3, 4], 5)
    assert 0 <= base < 2**64
    variants = [
        BlockAllocator.hash_block(12, [1, 2, 3, 4], 5),  # parent
        BlockAllocator.hash_block(11, [1, 2, 3, 4], 6),  # extra (e.g. another image)
        BlockAllocator.hash_block(11, [1, 2, 4, 3], 5),  # order
        BlockAllocator.hash_block(11, [1, 2, 3], 5),  # length
        BlockAllocator.hash_block(11, [1, 2, 3, 4, 0], 5),  # trailing zero token
        BlockAllocator.hash_block(11, [1, 2, 3, 4]),  # default extra is 0
    ]
    assert len({base, *variants}) == 1 + len(variants)
    assert BlockAllocator.hash_block(11, [1, 2, 3, 4], 5) == base  # deterministic


def test_hash_accepts_lists_tuples_ranges_and_numpy_arrays_alike():
    tokens = [5, -1, 151643, 0, 77, 2**31 - 1]
    want = BlockAllocator.hash_block(9, tokens, 3)
    contiguous64 = np.array(tokens, dtype=np.int64)
    inputs = [
        tuple(tokens),
        [np.int64(t) for t in tokens],
        np.array(tokens, dtype=np.int32),
        contiguous64,
        np.repeat(contiguous64, 2)[::2],  # strided view, read in place
        np.array(tokens, dtype=">i4"),  # byte-swapped: converted
    ]
    for token_ids in inputs:
        assert BlockAllocator.hash_block(9, token_ids, 3) == want, repr(token_ids)
    assert BlockAllocator.hash_block(0, range(4)) == BlockAllocator.hash_block(0, [0, 1, 2, 3])
    # Other integer dtypes go through one converting copy.
    assert BlockAllocator.hash_block(0, np.array([1, 2], np.uint8)) == BlockAllocator.hash_block(0, [1, 2])
    assert BlockAllocator.hash_block(0, np.array([-2, 300], np.int16)) == BlockAllocator.hash_block(0, [-2, 300])
    assert BlockAllocator.hash_block(0, np.zeros(0, np.int32)) == BlockAllocator.hash_block(0, [])


def test_hash_takes_hash_arguments_modulo_2_64():
    assert BlockAllocator.hash_block(-1, [1], -2) == BlockAllocator.hash_block(2**64 - 1, [1], 2**64 - 2)
    assert BlockAllocator.hash_block(2**64 + 5, [1]) == BlockAllocator.hash_block(5, [1])


@pytest.mark.parametrize(
    "token_ids, error",
    [
        (np.array([1.0, 2.0]), TypeError),  # a float array is not token ids
        (np.array([True, False]), TypeError),
        (np.zeros((2, 2), np.int32), ValueError),
        ([1, 2.5], TypeError),
        ("abc", TypeError),
        (b"abc", TypeError),
        ([2**63], ValueError),  # does not fit int64
        (None, TypeError),
    ],
)
def test_hash_rejects_non_integer_token_ids(token_ids, error):
    with pytest.raises(error):
        BlockAllocator.hash_block(0, token_ids)


def test_hash_rejects_non_integer_hash_arguments():
    with pytest.raises(TypeError):
        BlockAllocator.hash_block(1.5, [1])
    with pytest.raises(TypeError):
        BlockAllocator.hash_block(0, [1], extra="image")


# ------------------------------------------------------------------------------------------------
# Prefix cache


def test_register_then_lookup_takes_a_reference():
    a = BlockAllocator(4, 4)
    b = a.allocate()
    h = BlockAllocator.hash_block(0, [1, 2, 3, 4])
    assert a.lookup(h) == -1
    assert a.register(b, h) is True
    assert a.num_cached_blocks == 1
    assert a.lookup(h) == b
    assert a.ref_count(b) == 2
    a.check_invariants()


def test_register_is_idempotent_but_a_block_cannot_change_hash():
    a = BlockAllocator(2, 4)
    b = a.allocate()
    assert a.register(b, 10) is True
    assert a.register(b, 10) is True
    with pytest.raises(ValueError, match="different hash"):
        a.register(b, 11)
    assert a.num_cached_blocks == 1 and a.lookup(11) == -1
    a.check_invariants()


def test_register_of_unused_block_raises():
    a = BlockAllocator(2, 4)
    with pytest.raises(ValueError, match="not in use"):
        a.register(0, 10)


def test_duplicate_hash_keeps_first_block_and_leaves_second_uncached():
    a = BlockAllocator(3, 4)
    first, second = a.allocate(), a.allocate()
    assert a.register(first, 42) is True
    assert a.register(second, 42) is False  # same content computed twice: first one stays the entry
    assert a.num_cached_blocks == 1
    a.free(second)
    assert a.num_evictable_blocks == 0  # uncached, so it went to the free list
    assert a.lookup(42) == first
    a.check_invariants()


def test_freed_cached_block_is_evictable_and_revived_by_lookup():
    a = BlockAllocator(3, 4)
    b = a.allocate()
    a.register(b, 42)
    a.free(b)
    assert (a.ref_count(b), a.num_evictable_blocks, a.num_cached_blocks, a.num_free_blocks) == (0, 1, 1, 3)
    a.check_invariants()
    assert a.lookup(42) == b  # prefix hit: ref 0 -> 1, out of the LRU
    assert (a.ref_count(b), a.num_evictable_blocks, a.num_cached_blocks, a.num_free_blocks) == (1, 0, 1, 2)
    a.check_invariants()
    a.free(b)
    with pytest.raises(ValueError):  # evictable blocks are revived by lookup, not incref
        a.incref(b)


def test_allocate_prefers_free_blocks_over_evicting_cached_ones():
    a = BlockAllocator(3, 4)
    cached = a.allocate()
    a.register(cached, 1)
    a.free(cached)
    assert {a.allocate(), a.allocate()} == {1, 2}
    assert a.lookup(1) == cached  # still cached


def test_eviction_is_oldest_released_first_and_drops_the_hash():
    a = BlockAllocator(4, 4)
    blocks = [a.allocate() for _ in range(4)]
    for b in blocks:
        a.register(b, 100 + b)
    release_order = [blocks[2], blocks[0], blocks[3], blocks[1]]
    for b in release_order:
        a.free(b)
    assert a.num_evictable_blocks == 4 and a.num_free_blocks == 4
    # Reviving blocks[0] and releasing it again makes it the newest in the LRU.
    assert a.lookup(100 + blocks[0]) == blocks[0]
    a.free(blocks[0])
    expected = [blocks[2], blocks[3], blocks[1], blocks[0]]
    for i, want in enumerate(expected):
        assert a.allocate() == want
        assert a.ref_count(want) == 1
        assert a.lookup(100 + want) == -1  # the evicted hash is gone
        assert a.num_cached_blocks == 3 - i
        a.check_invariants()
    with pytest.raises(OutOfBlocksError):
        a.allocate()


def test_evicted_block_can_be_registered_under_a_new_hash():
    a = BlockAllocator(1, 4)
    b = a.allocate()
    a.register(b, 1)
    a.free(b)
    assert a.allocate() == b  # evicts hash 1
    assert a.register(b, 2) is True
    assert a.lookup(1) == -1 and a.lookup(2) == b


def test_prefix_caching_disabled():
    a = BlockAllocator(2, 4, enable_prefix_caching=False)
    b = a.allocate()
    assert a.register(b, 42) is False
    assert a.lookup(42) == -1
    a.free(b)
    assert (a.num_cached_blocks, a.num_evictable_blocks, a.num_free_blocks) == (0, 0, 2)
    a.check_invariants()


def test_hash_lookup_is_modulo_2_64():
    a = BlockAllocator(2, 4)
    b = a.allocate()
    a.register(b, -1)
    assert a.lookup(2**64 - 1) == b


def test_chained_prefix_reuse():
    """Two prompts sharing their first two blocks: the second finds both and allocates only the rest."""
    a = BlockAllocator(8, 4)
    prompt = np.arange(12, dtype=np.int32)  # three full blocks
    parent, table = 0, []
    for start in range(0, 12, 4):
        parent = BlockAllocator.hash_block(parent, prompt[start:start + 4])
        block = a.allocate()
        a.register(block, parent)
        table.append(block)
    for block in reversed(table):  # tail first, so heads outlive tails in the LRU
        a.free(block)

    other = np.concatenate([prompt[:8], np.array([99, 98, 97, 96], np.int32)])
    parent, hits = 0, []
    for start in range(0, 12, 4):
        parent = BlockAllocator.hash_block(parent, other[start:start + 4])
        hits.append(a.lookup(parent))
    assert hits == [table[0], table[1], -1]
    a.check_invariants()


# ------------------------------------------------------------------------------------------------
# Import shim


def test_native_shim_explains_a_missing_build(monkeypatch):
    import importlib

    monkeypatch.delitem(sys.modules, "blip3o_engine.native")
    monkeypatch.setitem(sys.modules, "blip3o_engine._C", None)  # makes `import blip3o_engine._C` fail
    monkeypatch.delattr(blip3o_engine, "_C")
    with pytest.raises(ImportError, match=r"pip install -e \."):
        importlib.import_module("blip3o_engine.native")


def test_exceptions_are_registered_classes():
    assert issubclass(InvariantError, RuntimeError)
    assert OutOfBlocksError.__module__ == InvariantError.__module__ == "blip3o_engine._C"


# ------------------------------------------------------------------------------------------------
# Property test: random operation sequences against a Python model

HASHES = st.sampled_from([0, 1, 2, 3, 2**64 - 1])  # few values, so collisions and hits are common


class AllocatorMachine(RuleBasedStateMachine):
    """Mirrors the allocator with plain Python structures and compares after every step."""

    @initialize(num_blocks=st.integers(1, 6), caching=st.booleans())
    def create(self, num_blocks: int, caching: bool) -> None:
        self.alloc = BlockAllocator(num_blocks, 4, enable_prefix_caching=caching)
        self.caching = caching
        self.ref = [0] * num_blocks
        self.free_stack = list(range(num_blocks - 1, -1, -1))  # pop() gives the next block
        self.lru: list[int] = []  # oldest first
        self.hash_of: dict[int, int] = {}
        self.block_of: dict[int, int] = {}

    def _blocks(self, in_use: bool) -> list[int]:
        return [b for b, r in enumerate(self.ref) if (r > 0) == in_use]

    @rule()
    def allocate(self) -> None:
        if self.free_stack:
            want = self.free_stack.pop()
        elif self.lru:
            want = self.lru.pop(0)
            del self.block_of[self.hash_of.pop(want)]
        else:
            with pytest.raises(OutOfBlocksError):
                self.alloc.allocate()
            return
        assert self.alloc.allocate() == want
        self.ref[want] = 1

    @precondition(lambda self: any(r > 0 for r in self.ref))
    @rule(data=st.data())
    def free(self, data) -> None:
        b = data.draw(st.sampled_from(self._blocks(in_use=True)))
        self.alloc.free(b)
        self.ref[b] -= 1
        if self.ref[b] == 0:
            (self.lru if b in self.hash_of else self.free_stack).append(b)

    @precondition(lambda self: any(r > 0 for r in self.ref))
    @rule(data=st.data())
    def incref(self, data) -> None:
        b = data.draw(st.sampled_from(self._blocks(in_use=True)))
        self.alloc.incref(b)
        self.ref[b] += 1

    @precondition(lambda self: any(r == 0 for r in self.ref))
    @rule(data=st.data())
    def misuse_unreferenced_block(self, data) -> None:
        b = data.draw(st.sampled_from(self._blocks(in_use=False)))
        for call in (self.alloc.free, self.alloc.incref, lambda x: self.alloc.register(x, 0)):
            with pytest.raises(ValueError):
                call(b)

    @precondition(lambda self: any(r > 0 for r in self.ref))
    @rule(data=st.data(), h=HASHES)
    def register(self, data, h: int) -> None:
        b = data.draw(st.sampled_from(self._blocks(in_use=True)))
        if b in self.hash_of and self.hash_of[b] != h:
            with pytest.raises(ValueError):
                self.alloc.register(b, h)
            return
        want = self.caching and (self.hash_of.get(b) == h or h not in self.block_of)
        assert self.alloc.register(b, h) is want
        if want:
            self.hash_of[b], self.block_of[h] = h, b

    @rule(h=HASHES)
    def lookup(self, h: int) -> None:
        b = self.block_of.get(h, -1)
        assert self.alloc.lookup(h) == b
        if b >= 0:
            if self.ref[b] == 0:
                self.lru.remove(b)
            self.ref[b] += 1

    @invariant()
    def agrees_with_model(self) -> None:
        self.alloc.check_invariants()
        assert [self.alloc.ref_count(b) for b in range(len(self.ref))] == self.ref
        assert self.alloc.num_free_blocks == len(self.free_stack) + len(self.lru)
        assert self.alloc.num_evictable_blocks == len(self.lru)
        assert self.alloc.num_cached_blocks == len(self.block_of)

    def teardown(self) -> None:
        """Releasing every reference leaves no leak: each block is free or evictable, ref 0."""
        for b, r in enumerate(self.ref):
            for _ in range(r):
                self.alloc.free(b)
        self.alloc.check_invariants()
        n = self.alloc.num_blocks
        assert [self.alloc.ref_count(b) for b in range(n)] == [0] * n
        assert self.alloc.num_free_blocks == n
        assert self.alloc.num_evictable_blocks == self.alloc.num_cached_blocks == len(self.block_of)
        assert sorted(self.alloc.allocate() for _ in range(n)) == list(range(n))
        with pytest.raises(OutOfBlocksError):
            self.alloc.allocate()


AllocatorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestAllocatorMachine = AllocatorMachine.TestCase
